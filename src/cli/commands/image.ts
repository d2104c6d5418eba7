// eslint-disable-next-line @typescript-eslint/no-explicit-any -- yargs builder typing is loose on purpose here
import type { Argv as YArgv } from 'yargs';
type Argv<_T = any> = any;
import { validateName } from '../../errors.js';
import { call, out, type GlobalArgs } from '../context.js';
import { c, fmtBytes, table } from '../output.js';

const show = (i: any) =>
  [
    `${c.bold(i.name)}  created ${i.createdAt}`,
    `  kernel   ${i.kernel}`,
    `  vmlinux  ${i.vmlinux ?? '-'}`,
    `  initrd   ${i.initrd ?? '-'}`,
    `  rootfs   ${i.rootfs}`,
    `  workSeed ${i.workSeed}`,
    `  size     ${fmtBytes(i.sizeBytes)}, ${i.packages} packages`,
    `  used by  ${i.usedBy?.length ? i.usedBy.join(', ') : '-'}`,
  ].join('\n');

export function imageCommands(y: Argv<any>): Argv<any> {
  return y
    .command(
      'pull <name>',
      'build a known image (debian-bookworm, debian-trixie) from Debian\'s mirror',
      (a: Argv) =>
        a
          .positional('name', { type: 'string', demandOption: true })
          .option('mirror', { type: 'string', describe: 'Debian mirror URL (default: the one in the host\'s apt sources)' })
          .option('force', { type: 'boolean', describe: 'rebuild even if present' }),
      async (a: GlobalArgs & { name: string; mirror?: string; force?: boolean }) => {
        validateName('image', a.name);
        const t0 = Date.now();
        const r = await call('image.pull', { name: a.name, mirror: a.mirror, force: a.force });
        out(a, r, () => `${r.pulled ? 'built' : 'present'} ${c.bold(r.name)} (${fmtBytes(r.sizeBytes)}) in ${((Date.now() - t0) / 1000).toFixed(1)}s`);
      },
    )
    .command(
      'import <name>',
      'import an image from a rootfs and a kernel',
      (a: Argv) =>
        a
          .positional('name', { type: 'string', demandOption: true })
          .option('rootfs', { type: 'string', demandOption: true })
          .option('kernel', { type: 'string', demandOption: true })
          .option('initrd', { type: 'string' }),
      async (a: GlobalArgs & { name: string; rootfs: string; kernel: string; initrd?: string }) => {
        validateName('image', a.name);
        const { resolve } = await import('node:path');
        const r = await call('image.import', { name: a.name, rootfs: resolve(a.rootfs), kernel: resolve(a.kernel), initrd: a.initrd ? resolve(a.initrd) : undefined });
        out(a, r, () => show(r));
      },
    )
    .command('list', 'list images', {}, async (a: GlobalArgs) => {
      const r = await call('image.list', {});
      out(a, r, () => (r.length ? table([['NAME', 'CREATED', 'SIZE', 'PACKAGES', 'USED BY'], ...r.map((i: any) => [c.bold(i.name), i.createdAt, fmtBytes(i.sizeBytes), String(i.packages), i.usedBy.join(',') || '-'])]) : 'no images (banger image pull debian-bookworm)'));
    })
    .command('show <name>', 'show an image', (a: Argv) => a.positional('name', { type: 'string', demandOption: true }), async (a: GlobalArgs & { name: string }) => {
      validateName('image', a.name);
      const r = await call('image.show', { name: a.name });
      out(a, r, () => show(r));
    })
    .command('delete <name>', 'delete an image (refused while a VM uses it)', (a: Argv) => a.positional('name', { type: 'string', demandOption: true }), async (a: GlobalArgs & { name: string }) => {
      validateName('image', a.name);
      const r = await call('image.delete', { name: a.name });
      out(a, r, () => `deleted image ${a.name}`);
    })
    .demandCommand(1, 'name an image command: pull, import, list, show or delete');
}
