import { resolve } from 'node:path';
import type { Argv } from 'yargs';
import { validateName } from '../../errors.js';
import type { ImageView } from '../../rpc/types.js';
import { call, out, type GlobalArgs } from '../context.js';
import { c, fmtBytes, table } from '../output.js';

const show = (i: ImageView) =>
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

const listing = (images: ImageView[]) =>
  images.length
    ? table([['NAME', 'CREATED', 'SIZE', 'PACKAGES', 'USED BY'], ...images.map((i) => [c.bold(i.name), i.createdAt, fmtBytes(i.sizeBytes), String(i.packages), i.usedBy.join(',') || '-'])])
    : 'no images (banger image pull debian-bookworm)';

interface NameArgs extends GlobalArgs {
  name: string;
}

const named = <T>(a: Argv<T>) => a.positional('name', { type: 'string', demandOption: true });

export function imageCommands(y: Argv<GlobalArgs>): Argv<GlobalArgs> {
  return y
    .command(
      'pull <name>',
      'build a known image (debian-bookworm, debian-trixie) from Debian\'s mirror',
      (a) =>
        named(a)
          .option('mirror', { type: 'string', describe: 'Debian mirror URL (default: the one in the host\'s apt sources)' })
          .option('force', { type: 'boolean', describe: 'rebuild even if present' }),
      async (a) => {
        validateName('image', a.name);
        const t0 = Date.now();
        const r = await call('image.pull', { name: a.name, mirror: a.mirror, force: a.force });
        out(a, r, () => `${r.pulled ? 'built' : 'present'} ${c.bold(r.name)} (${fmtBytes(r.sizeBytes)}) in ${((Date.now() - t0) / 1000).toFixed(1)}s`);
      },
    )
    .command(
      'import <name>',
      'import an image from a rootfs and a kernel',
      (a) => named(a).option('rootfs', { type: 'string', demandOption: true }).option('kernel', { type: 'string', demandOption: true }).option('initrd', { type: 'string' }),
      async (a) => {
        validateName('image', a.name);
        const r = await call('image.import', { name: a.name, rootfs: resolve(a.rootfs), kernel: resolve(a.kernel), initrd: a.initrd ? resolve(a.initrd) : undefined });
        out(a, r, () => show(r));
      },
    )
    .command('list', 'list images', (a) => a, async (a) => {
      const r = await call('image.list', {});
      out(a, r, () => listing(r));
    })
    .command('show <name>', 'show an image', named, async (a: NameArgs) => {
      validateName('image', a.name);
      const r = await call('image.show', { name: a.name });
      out(a, r, () => show(r));
    })
    .command('delete <name>', 'delete an image (refused while a VM uses it)', named, async (a: NameArgs) => {
      validateName('image', a.name);
      const r = await call('image.delete', { name: a.name });
      out(a, r, () => `deleted image ${a.name}`);
    })
    .demandCommand(1, 'name an image command: pull, import, list, show or delete');
}
