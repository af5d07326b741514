"""Mutation audit: one-line mistakes a developer could plausibly make, and whether the
fast core of the suite catches each.

Every mutant replaces one exact snippet of the library (the script refuses a snippet
that is missing or not unique, so the list stays true to the code), runs the fast core
of the suite with ``-x`` (a mutant is *killed* when a test fails), and restores the file.
Not part of the test run (pytest collects ``test_*.py`` only); run it by hand, in a
copy of the tree that nobody edits meanwhile (it rewrites library files while it runs),
e.g. ``git worktree add /tmp/audit HEAD && cd /tmp/audit``:

  python tests/mutation_audit.py [--only NAME ...] [--out benchmarks/results/mutation_audit.json]

It takes ~20-40 s per killed mutant and a few minutes per survivor on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE = ['tests/test_optim.py', 'tests/test_golden.py', 'tests/test_training_path.py',
        'tests/test_boundaries.py', 'tests/test_losses.py', 'tests/test_composition.py',
        'tests/test_data.py', 'tests/test_analysis.py', 'tests/test_builders.py',
        'tests/test_run_safety.py', 'sse_sam_jax/optim',
        'sse_sam_jax/losses.py', 'sse_sam_jax/data/profiles.py']

T = 'sse_sam_jax/train/'
# name: (a snippet of the library, found in exactly one file under sse_sam_jax/; its
# replacement). Where the snippet lives is looked up, so the table survives files moving.
MUTANTS = {
    'sam_norm_eps_large': ('NORM_EPS = 1e-16',
                          'NORM_EPS = 1e-3'),
    'perturb_sign': ('(p + jnp.asarray(scale).astype(dtype) * step)',
                    '(p - jnp.asarray(scale).astype(dtype) * step)'),
    'sam_mean_not_sum': ('direction = vjp_p(jnp.full_like(losses_p, 1.0 / n))[0]',
                        'direction = vjp_p(jnp.full_like(losses_p, 1.0))[0]'),
    'sam_ascent_from_updates': ('return core._cast_like(vjp_fn(jnp.full_like(losses, 1.0 / n))[0], params)',
                               'return core._cast_like(updates, params)'),
    'group_norm_batch_swapped': ("  if normalization == 'batch':\n    return onehot * weights / batch",
                                "  if normalization == 'group':\n    return onehot * weights / batch"),
    'group_empty_divides_by_zero': ('jnp.where(sizes > 0, sizes, 1)',
                                   'sizes'),
    'group_weight_ignored': ('return onehot * weights / batch',
                            'return onehot / batch'),
    'group_skip_zero_radius_wrongly': ('        if not core._is_static_zero(rho):\n          perturbed',
                                      '        if core._is_static_zero(rho):\n          perturbed'),
    'group_perturb_from_total': ('perturbed = perturb(params, grad_k, core._radius_at(rho, state.count), full_mask,',
                                'perturbed = perturb(params, vjp_fn(jnp.sum(coeffs, 0))[0], core._radius_at(rho, state.count), full_mask,'),
    'mask_ignored': ('    if not m:\n      return p\n',
                    ''),
    'notfinite_not_counted': ('notfinite = notfinite + jnp.logical_not(finite)',
                             'notfinite = notfinite + 0 * jnp.logical_not(finite)'),
    'switch_boundary_gt': ('jnp.sum(state.count >= jnp.asarray',
                          'jnp.sum(state.count > jnp.asarray'),
    'switch_step_floor': ('return math.ceil(gamma * epochs) * int(steps_per_epoch)',
                         'return math.floor(gamma * epochs) * int(steps_per_epoch)'),
    'tail_rho_restarts_at_switch': ('(0.0, _shifted(tail_rho, switch_step))',
                                   '(0.0, tail_rho)'),
    'stage2_perturbs_head': ('(0.0, _shifted(tail_rho, switch_step))',
                            '(head_rho, _shifted(tail_rho, switch_step))'),
    'stage_at_left': ("step, side='right'",
                     "step, side='left'"),
    'eager_stage_off_by_one': ('stage = stage_at(int(state.count), boundaries)',
                              'stage = stage_at(int(state.count) + 1, boundaries)'),
    'eager_reuse_kind_inverted': ('sharpness_step = is_sharpness_step(int(state.count), steps)',
                                 'sharpness_step = not is_sharpness_step(int(state.count), steps)'),
    'tail_mask_le': ('return counts < eta',
                    'return counts <= eta'),
    'chain_guard_off': ('    if position > 0:',
                       '    if position > 99:'),
    'multisteps_guard_off': ("    if kind == 'MultiSteps':",
                            "    if kind == 'MultiSteps_':"),
    'ce_weights_not_normalized': ('return w * losses * (n / jnp.maximum(jnp.sum(real), 1e-12))',
                                 'return w * losses'),
    'cb_weights_beta_flipped': ('w = (1.0 - beta) / (1.0 - np.power(beta, counts))',
                               'w = (1.0 - beta) / (1.0 - np.power(beta, 1.0 / counts))'),
    'ldam_margin_power': ('m = 1.0 / np.sqrt(np.sqrt(counts))',
                         'm = 1.0 / np.sqrt(counts)'),
    'ldam_margin_added': ('adjusted = logits - onehot * margins[labels][:, None]',
                         'adjusted = logits + onehot * margins[labels][:, None]'),
    'la_sign': ('adjusted = logits + tau * jnp.asarray(log_prior',
               'adjusted = logits - tau * jnp.asarray(log_prior'),
    'vs_gamma_ignored': ('(counts / counts.max()) ** gamma',
                        '(counts / counts.max())'),
    'profile_exponent': ('** (i / (num_classes - 1.0))',
                        '** (i / num_classes)'),
    'profile_step_half': ('half = num_classes // 2',
                         'half = (num_classes + 1) // 2'),
    'selection_no_shuffle': ("    if selection == 'shuffle':\n      rng.shuffle(idx)\n",
                            ''),
    'many_ge': ('many = self.counts > self.many_above',
               'many = self.counts >= self.many_above'),
    'few_le': ('few = self.counts < self.few_below',
              'few = self.counts <= self.few_below'),
    'wd_before_transform': ('  parts = [direction] if direction is not None else []\n',
                           '  parts = [optax.add_decayed_weights(o.weight_decay)] + ([direction] if direction is not None else [])\n'),
    'drw_by_step': ('drw_step = int(l.drw_epoch) * steps_per_epoch',
                   'drw_step = int(l.drw_epoch)'),
    'imbsam_uses_rho': ("'imbsam': lambda: ssj.imbsam(o.tail_rho, **group_kw),",
                       "'imbsam': lambda: ssj.imbsam(o.rho, **group_kw),"),
    'sse_sam_no_boundary': ('boundaries = list(ssj.stage_boundaries(direction)) if direction is not None else []',
                           'boundaries = []'),
    'momentum_ignored': ('optax.sgd(lr, momentum=o.momentum, nesterov=',
                        'optax.sgd(lr, nesterov='),
    'nesterov_ignored': ("nesterov=o.base == 'nesterov')",
                        'nesterov=False)'),
    'clip_before_transform': ('    parts.append(optax.clip_by_global_norm(o.clip_norm))\n',
                             '    parts.insert(0, optax.clip_by_global_norm(o.clip_norm))\n'),
    'warmup_off_for_cosine': ('  return with_warmup(base, lr, warmup_epochs, steps_per_epoch)',
                             '  return base'),
    'neutral_key_lr': ("NEUTRAL_KEYS = ('eval.',",
                      "NEUTRAL_KEYS = ('optimizer.lr', 'eval.',"),
    'damaged_not_set_aside': ('      _damaged(checkpoints, step, e)\n      continue\n    return state, data_state, meta',
                             '      raise\n    return state, data_state, meta'),
    'bn_stats_not_updated': ('TrainState(step=state.step + 1, params=params, batch_stats=new_stats,',
                            'TrainState(step=state.step + 1, params=params, batch_stats=state.batch_stats,'),
    'perturbed_eval_mode': ('    logits, stats = apply(params, state.batch_stats, x)\n',
                           '    logits, stats = model.apply(params, state.batch_stats, x, train=False)\n'),
    'no_shared_clean_pass_groups': ("extra['group_ids'] = jnp.asarray(class_groups)[labels]",
                                   "extra['group_ids'] = jnp.zeros_like(labels)"),
    'loss_at_next_step': ('example_losses = lambda logits: loss(logits, labels, state.step)',
                         'example_losses = lambda logits: loss(logits, labels, state.step + 1)'),
    'padding_in_batch_norm': ('    if mask is None and outer is not None:',
                             '    if False:'),
    'padding_weight_not_rescaled': ('weight = jnp.where(mask, b / jnp.maximum(count, 1).astype(losses.dtype), 0)',
                                   'weight = jnp.where(mask, 1.0, 0)'),
    'padding_counted_by_class_weights': ('real = w if mask is None else w * mask',
                                        'real = w'),
    'padding_counted_by_group_normalize': ('    onehot = onehot & mask[:, None]\n',
                                          '    pass\n'),
    'padding_rows_on_the_first_shard': ("out['mask'] = np.tile(real, shards)",
                                       "out['mask'] = np.arange(size) < rows"),
    'lanczos_no_reorth': ('    w = reorth(reorth(w, V), V)  # twice is enough (Kahan-Parlett)',
                         '    w = w - alpha * basis[-1] - (betas[-1] * basis[-2] if betas else 0.0)'),
}


# The test files that guard each file (a mutant runs these with -x; CORE when not listed).
GUARDS = {
    'sse_sam_jax/losses.py': ['tests/test_losses.py', 'tests/test_training_path.py',
                              'sse_sam_jax/losses.py'],
    'sse_sam_jax/data/profiles.py': ['tests/test_data.py', 'tests/test_boundaries.py',
                                     'sse_sam_jax/data/profiles.py'],
    'sse_sam_jax/data/stats.py': ['tests/test_data.py', 'tests/test_boundaries.py',
                                  'tests/test_trainer.py'],
    T + 'setup.py': ['tests/test_training_path.py', 'tests/test_builders.py',
                     'tests/test_trainer.py'],
    T + 'schedules.py': ['tests/test_builders.py', 'tests/test_trainer.py'],
    T + 'step.py': ['tests/test_training_path.py', 'tests/test_trainer.py'],
    T + 'dispatch.py': ['tests/test_training_path.py', 'tests/test_throughput.py',
                        'tests/test_scale_out.py'],
    'sse_sam_jax/models/masking.py': ['tests/test_training_path.py'],
    T + 'workdir.py': ['tests/test_run_safety.py'],
    T + 'resume.py': ['tests/test_run_safety.py'],
    'sse_sam_jax/analysis/hessian.py': ['tests/test_analysis.py'],
}


def locate(name, original):
  """The library file that holds ``original`` exactly once (refuses anything else)."""
  hits = {path: path.read_text().count(original)
          for path in sorted((ROOT / 'sse_sam_jax').rglob('*.py'))}
  hits = {path: n for path, n in hits.items() if n}
  if list(hits.values()) != [1]:
    where = {str(p.relative_to(ROOT)): n for p, n in hits.items()}
    raise SystemExit(f'{name}: the snippet must occur once in one file; found {where or "none"}.')
  return next(iter(hits))


def run_mutant(name, timeout):
  original, mutant = MUTANTS[name]
  path = locate(name, original)
  file = path.relative_to(ROOT).as_posix()
  text = path.read_text()
  path.write_text(text.replace(original, mutant))
  t0 = time.perf_counter()
  try:
    proc = subprocess.run([sys.executable, '-m', 'pytest', '-x', '-q', '-n', '2',
                           '-p', 'no:cacheprovider', *GUARDS.get(file, CORE)], cwd=ROOT,
                          capture_output=True,
                          text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    failed = [l for l in proc.stdout.splitlines() if l.startswith('FAILED')]
    killed = proc.returncode != 0
    return dict(file=file, killed=killed, by=failed[:1], seconds=round(time.perf_counter() - t0))
  except subprocess.TimeoutExpired:
    return dict(file=file, killed=False, by=['timeout'], seconds=timeout)
  finally:
    path.write_text(text)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--only', nargs='*')
  parser.add_argument('--timeout', type=int, default=900)
  parser.add_argument('--out', default='benchmarks/results/mutation_audit.json')
  args = parser.parse_args()
  names = args.only or list(MUTANTS)
  results = {}
  for name in names:
    results[name] = run_mutant(name, args.timeout)
    r = results[name]
    print(f"{name:32s} {'killed' if r['killed'] else 'SURVIVED':8s} {r['seconds']:4d}s "
          f"{(r['by'] or [''])[0][:90]}", flush=True)
  killed = sum(r['killed'] for r in results.values())
  print(f'mutation score: {killed}/{len(results)}')
  out = ROOT / args.out
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(score=f'{killed}/{len(results)}', mutants=results), indent=1))


if __name__ == '__main__':
  main()
