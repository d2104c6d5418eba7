/** Waiting on real conditions instead of sleeping: a poll with a bound, and a bound on a promise. */

/**
 * Polls `cond` every `everyMs` until it holds; throws naming `what` after `timeoutMs`. The bound is generous on
 * purpose (a loaded machine is slow): it only turns a hang into a clear failure, it is not a performance claim.
 */
export async function waitUntil(what: string, cond: () => boolean | Promise<boolean>, timeoutMs = 15_000, everyMs = 20): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await cond()) return;
    if (Date.now() >= deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** `p`, or an error naming `what` when it has not settled within `timeoutMs`. */
export async function within<T>(what: string, p: Promise<T>, timeoutMs = 15_000): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)), timeoutMs);
  });
  try {
    return await Promise.race([p, timeout]);
  } finally {
    clearTimeout(timer);
  }
}
