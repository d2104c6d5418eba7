import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { diagramFile, MACHINES, render } from '../../scripts/diagrams.js';

describe('diagrams/', () => {
  for (const name of Object.keys(MACHINES)) {
    it(`${name}.mmd is generated from the current machine (run npm run diagrams when this fails)`, () => {
      expect(readFileSync(diagramFile(name), 'utf8')).toBe(render(name));
    });
  }
});
