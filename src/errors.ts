/**
 * Every error banger expects carries a kind, a JSON-RPC code and a hint that tells the user the fix.
 * Codes live in the JSON-RPC "server error" range reserved for implementations (-32000..-32099).
 */
export const ErrorCodes = {
  ParseError: -32700,
  InvalidRequest: -32600,
  MethodNotFound: -32601,
  InvalidParams: -32602,
  Internal: -32603,
  NotFound: -32001,
  InvalidState: -32002,
  Conflict: -32003,
  HostFailure: -32004,
  Timeout: -32005,
  Unsupported: -32006,
  Aborted: -32007,
  Usage: -32008,
} as const;

export type ErrorKind =
  | 'parse'
  | 'invalid_request'
  | 'method_not_found'
  | 'invalid_params'
  | 'internal'
  | 'not_found'
  | 'invalid_state'
  | 'conflict'
  | 'host'
  | 'timeout'
  | 'unsupported'
  | 'aborted'
  | 'usage';

const kindCode: Record<ErrorKind, number> = {
  parse: ErrorCodes.ParseError,
  invalid_request: ErrorCodes.InvalidRequest,
  method_not_found: ErrorCodes.MethodNotFound,
  invalid_params: ErrorCodes.InvalidParams,
  internal: ErrorCodes.Internal,
  not_found: ErrorCodes.NotFound,
  invalid_state: ErrorCodes.InvalidState,
  conflict: ErrorCodes.Conflict,
  host: ErrorCodes.HostFailure,
  timeout: ErrorCodes.Timeout,
  unsupported: ErrorCodes.Unsupported,
  aborted: ErrorCodes.Aborted,
  usage: ErrorCodes.Usage,
};

export class BangerError extends Error {
  readonly kind: ErrorKind;
  readonly hint?: string;
  readonly code: number;
  constructor(kind: ErrorKind, message: string, hint?: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'BangerError';
    this.kind = kind;
    this.hint = hint;
    this.code = kindCode[kind];
  }
  /** Exit status for the CLI: 2 for usage errors, 1 for everything else. */
  get exitCode(): number {
    return this.kind === 'usage' || this.kind === 'invalid_params' ? 2 : 1;
  }
}

export const isBangerError = (e: unknown): e is BangerError => e instanceof BangerError;

export function errorMessage(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/** Plain-identifier rule shared by VM names, image names and anything that ends up in a path or a device name. */
export const NAME_RE = /^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$/;

export function validateName(what: string, name: string): string {
  if (typeof name !== 'string' || !NAME_RE.test(name) || name.includes('..')) {
    throw new BangerError(
      'usage',
      `invalid ${what} name ${JSON.stringify(name)}`,
      `a ${what} name is 1-63 characters of letters, digits, '.', '_' and '-', starting with a letter or digit`,
    );
  }
  return name;
}
