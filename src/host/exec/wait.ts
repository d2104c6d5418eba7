/** Small helpers shared by the VMM drivers: an abortable sleep and the Unix socket path limit. */
import { BangerError } from '../../errors.js';

/** Unix socket paths must fit sockaddr_un.sun_path (108 bytes including the NUL). */
export const MAX_SOCKET_PATH = 107;

export function aborted(what: string, signal?: AbortSignal): BangerError {
  const r = signal?.reason;
  const why = r instanceof Error ? r.message : typeof r === 'string' ? r : undefined;
  return new BangerError('aborted', `${what}: aborted${why ? ` (${why})` : ''}`);
}

export const sleep = (ms: number, signal?: AbortSignal) =>
  new Promise<void>((res, rej) => {
    if (signal?.aborted) return rej(aborted('wait', signal));
    const t = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      res();
    }, ms);
    const onAbort = () => {
      clearTimeout(t);
      rej(aborted('wait', signal));
    };
    signal?.addEventListener('abort', onAbort, { once: true });
  });

export function checkSocketPath(path: string): string {
  if (Buffer.byteLength(path) > MAX_SOCKET_PATH) {
    throw new BangerError(
      'host',
      `socket path too long (${Buffer.byteLength(path)} bytes, the limit is ${MAX_SOCKET_PATH}): ${path}`,
      'set BANGER_RUNTIME_DIR (or XDG_RUNTIME_DIR) to a shorter directory',
    );
  }
  return path;
}
