/**
 * Cleanups registered as resources are acquired, run once in reverse order, errors joined
 * (firecracker-go-sdk's doCleanup, lima's hostagent cleanUp).
 */
export class Cleanups {
  private fns: Array<{ name: string; fn: () => unknown | Promise<unknown> }> = [];
  add(name: string, fn: () => unknown | Promise<unknown>): void {
    this.fns.push({ name, fn });
  }
  /** Forget everything registered: the resources now belong to the caller's result. */
  release(): void {
    this.fns = [];
  }
  async run(): Promise<void> {
    const errors: string[] = [];
    const fns = this.fns.reverse();
    this.fns = [];
    for (const { name, fn } of fns) {
      try {
        await fn();
      } catch (e) {
        errors.push(`${name}: ${(e as Error)?.message ?? e}`);
      }
    }
    if (errors.length) throw new Error(`cleanup failed: ${errors.join('; ')}`);
  }
}
