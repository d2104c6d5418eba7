/**
 * Named, ordered, swappable steps (firecracker-go-sdk's Handler / HandlerList): the launch is a list of
 * {name, fn} that a caller can append to, remove from or swap by name, run in order, each logged with its time,
 * stopping at the first error.
 */
import { errorMessage } from '../../../errors.js';

export interface Handler<C> {
  name: string;
  fn: (ctx: C) => Promise<unknown>;
}

/** A handler failed: `handler` is its name, `cause` what it threw. */
export class HandlerFailed extends Error {
  constructor(
    readonly handler: string,
    readonly cause: unknown,
  ) {
    super(`${handler}: ${errorMessage(cause)}`);
  }
}

export class HandlerList<C> {
  private list: Array<Handler<C>>;

  constructor(handlers: ReadonlyArray<Handler<C>> = []) {
    this.list = [...handlers];
  }

  get names(): string[] {
    return this.list.map((h) => h.name);
  }

  has(name: string): boolean {
    return this.list.some((h) => h.name === name);
  }

  append(...handlers: Array<Handler<C>>): this {
    this.list.push(...handlers);
    return this;
  }

  prepend(...handlers: Array<Handler<C>>): this {
    this.list.unshift(...handlers);
    return this;
  }

  remove(name: string): this {
    this.list = this.list.filter((h) => h.name !== name);
    return this;
  }

  /** Puts `handler` in the place of the one with the same name; false when there is none. */
  swap(handler: Handler<C>): boolean {
    const i = this.list.findIndex((h) => h.name === handler.name);
    if (i < 0) return false;
    this.list[i] = handler;
    return true;
  }

  /** Runs the handlers in order, logging `<label>: <name> <ms> ms` for each; throws HandlerFailed at the first error. */
  async run(ctx: C, log: (line: string) => void, label: string): Promise<void> {
    for (const h of [...this.list]) {
      const started = Date.now();
      try {
        await h.fn(ctx);
      } catch (e) {
        log(`${label}: ${h.name} failed after ${Date.now() - started} ms: ${errorMessage(e)}`);
        throw new HandlerFailed(h.name, e);
      }
      log(`${label}: ${h.name} ${Date.now() - started} ms`);
    }
  }
}
