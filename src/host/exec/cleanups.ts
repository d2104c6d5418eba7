import { errorMessage } from '../../errors.js';

/**
 * Cleanups registered as resources are acquired, run once in reverse order, errors joined
 * (firecracker-go-sdk's doCleanup, lima's hostagent cleanUp).
 */
export class Cleanups {
  private fns: Array<{ name: string; fn: () => unknown }> = [];

  /** Registers `fn`; returns a function that unregisters it (the resource was handed on or released already). */
  add(name: string, fn: () => unknown): () => void {
    const item = { name, fn };
    this.fns.push(item);
    return () => {
      const i = this.fns.indexOf(item);
      if (i >= 0) this.fns.splice(i, 1);
    };
  }

  /** Forget everything registered: the resources now belong to the caller's result. */
  release(): void {
    this.fns = [];
  }

  /** Runs every cleanup, last registered first; returns the failures as `name: message`, never throws. */
  async runAll(): Promise<string[]> {
    const failures: string[] = [];
    const fns = this.fns.reverse();
    this.fns = [];
    for (const { name, fn } of fns) {
      try {
        await fn();
      } catch (e) {
        failures.push(`${name}: ${errorMessage(e)}`);
      }
    }
    return failures;
  }

  /** Runs every cleanup like runAll, then throws one error naming every failure. */
  async run(): Promise<void> {
    const failures = await this.runAll();
    if (failures.length) throw new Error(`cleanup failed: ${failures.join('; ')}`);
  }
}
