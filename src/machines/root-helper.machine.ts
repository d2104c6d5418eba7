/**
 * The root-helper connection as a statechart: connecting → connected → (connection lost) → backoff →
 * connecting, with an exponential backoff kept in context. Requests made while it is not connected wait
 * (bounded) for `connected` — that is the queue. Pure: `connect` and `watch` are supplied from src/actors.
 */
import { assign, fromPromise, setup } from 'xstate';

export interface RootHelperContext {
  attempts: number;
  backoffMs: number;
  lastError: string | null;
  /** The live connection; not persisted (this actor is rebuilt on every daemon start). */
  client: unknown;
}

export const rootHelperMachine = setup({
  types: {
    context: {} as RootHelperContext,
    events: {} as { type: 'RETRY' } | { type: 'DISABLE' },
  },
  actors: {
    connect: fromPromise<unknown, void>(async () => {
      throw new Error('actor connect was not provided');
    }),
    watch: fromPromise<void, { client: unknown }>(async () => {
      throw new Error('actor watch was not provided');
    }),
  },
  delays: {
    backoff: ({ context }) => context.backoffMs,
  },
}).createMachine({
  id: 'rootHelper',
  context: { attempts: 0, backoffMs: 250, lastError: null, client: null },
  initial: 'connecting',
  on: { DISABLE: '.disabled' },
  states: {
    connecting: {
      invoke: {
        id: 'connect',
        src: 'connect',
        onDone: { target: 'connected', actions: assign({ client: ({ event }) => event.output, attempts: 0, backoffMs: 250, lastError: null }) },
        onError: {
          target: 'backoff',
          actions: assign({
            attempts: ({ context }) => context.attempts + 1,
            lastError: ({ event }) => (event.error instanceof Error ? event.error.message : String(event.error)),
          }),
        },
      },
    },
    connected: {
      invoke: {
        id: 'watch',
        src: 'watch',
        input: ({ context }) => ({ client: context.client }),
        onDone: { target: 'backoff', actions: assign({ client: null, lastError: 'connection to the root helper closed' }) },
        onError: { target: 'backoff', actions: assign({ client: null }) },
      },
    },
    backoff: {
      after: {
        backoff: { target: 'connecting', actions: assign({ backoffMs: ({ context }) => Math.min(context.backoffMs * 2, 10_000) }) },
      },
      on: { RETRY: 'connecting' },
    },
    disabled: { type: 'final' },
  },
});
