"""Writes chapter 8 (the results of the version-2 benchmark) with nbformat: the book's
``book/08_results.ipynb``, or a draft of it (``book/drafts/08_results.ipynb``, not committed), and
optionally placeholder results files to develop it against.

    python book/drafts/make_08.py                      # write the draft (no outputs)
    python book/drafts/make_08.py --fake DIR           # write FAKE results files into DIR
    python book/drafts/make_08.py --execute DIR        # write the draft, then run it on DIR (papermill)
    python book/drafts/make_08.py --book               # write and run book/08_results.ipynb
    python book/drafts/make_08.py --book DIR           #   ... on DIR instead of results

``--fake`` writes the six CSV files and the two JSON files of ``results/`` (formats of
``cag.calibration`` and ``cag.benchmark_table``) with made-up but plausible values: 5 seeds on
``class``, 3 on ``global`` and ``full``, every arm and every declared comparison of
``configs/experiments/benchmark_v2.yaml`` (the comparisons computed from the fake summary by
``cag.benchmark_table.comparison_results``).
They are placeholders for the chapter's layout, never results.

``--execute`` runs the draft with ``results_dir=DIR`` through ``cag.book.execute`` (papermill,
volatile metadata stripped), removes the cell papermill injects (so that a later plain run reads
the default ``results``), and puts the draft banner first. ``--book`` does the same
into ``book/08_results.ipynb``, without the banner: the chapter is replaced only when every cell
ran (a failed run is left as ``book/08_results.failed.ipynb``). The chapter reads whatever the
results folder holds; on partial results (``runs.json``: ``complete`` false) it says which
comparisons are missing instead of failing.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
NOTEBOOK = HERE / "08_results.ipynb"
BOOK = REPO / "book" / "08_results.ipynb"
MAX_LINE = 100
BANNER = ("Draft: executed on the results folder given to `make_08.py --execute` (placeholder or "
          "partial results); the book's chapter is `book/08_results.ipynb` (`make_08.py --book`)")

# ----------------------------------------------------------------------------- the chapter

CELLS: list[tuple] = []


def md(text: str) -> None:
    CELLS.append(("markdown", text.strip("\n"), {}))


def code(text: str, *, check: bool = False, alt: str | None = None, caption: str | None = None,
         name: str | None = None, tags=()) -> None:
    meta: dict = {}
    tags = list(tags) + (["nbval-check-output"] if check else [])
    if tags:
        meta["tags"] = tags
    if alt:
        meta["mystnb"] = {"image": {"alt": alt}}
        if caption:
            meta["mystnb"]["figure"] = {"caption": caption, "name": name}
    CELLS.append(("code", text.strip("\n"), meta))



md(r"""
# 8 · Results

Does category-anchor guidance help on a shift of the kind it was built for, and, if it does,
does either of its two ingredients account for the difference? The paper reports one number per
method, with no spread over runs, on GTA5 and SYNTHIA → Cityscapes. This chapter answers on the
built-in benchmark, where every number can be regenerated, with one rule: **every sentence that
says one arm is better than another is printed by a cell from a 95 % interval over seeds**, for
comparisons declared in the experiment file before anything ran. (The exploratory section,
labelled as such, prints the same kind of sentence for comparisons chosen after seeing part of
the results; those confirm nothing.) The text around the cells says what each comparison asks
and how to read it; the answers are in the cells' outputs. An *arm* is one training recipe;
each is trained once per seed (the seed fixes the initial weights and the data order).

**Why the benchmark changed.** An earlier version of this chapter ran on version 1 of the
built-in benchmark. `docs/data.md` §7 ("Version 2") records the two reasons it was replaced:
on version 1's shift, re-estimating a source-only model's BatchNorm statistics on target images
(AdaBN, no training and no label) undid most of the shift. And four of its twelve classes stayed
at 0 IoU even for a model trained on the target labels. Its files and chapter are in git history
(`results/README.md`, "Version 1 (removed)"); this chapter prints no number of version 1.
Version 2 renders 17 classes at 96×192 with the small ones at visible sizes, and builds the
shift from five components, of which only one (`global`) is a colour change of the whole image,
the kind of shift normalisation statistics are designed to absorb; how much AdaBN changes each
preset's source-only result is measured below. The strengths of `class` and `full` were fixed on
target *val* against three of the calibration's four aims before any adaptation arm ran (the
calibration, below); the fourth, source-only's plateau, is still being measured, and `global`
has no aim.

Two commands write every file this chapter reads (`results/README.md`, "benchmark/"):
`python -m cag experiments configs/experiments/calibration_v2.yaml` and
`python -m cag experiments configs/experiments/benchmark_v2.yaml`.

:::{admonition} Run this chapter on your own results
:class: tip
The chapter only reads files. Point `results_dir` at another folder written by the same two
commands (for example with other seeds):
`papermill book/08_results.ipynb out.ipynb -p results_dir path/to/folder`.
:::
""")

code(r'''
# Parameters (papermill: -p NAME VALUE).
results_dir = "results"  # written by the calibration_v2 and benchmark_v2 experiment files
experiment = "configs/experiments/benchmark_v2.yaml"  # the file that declared the comparisons
''', tags=["parameters"])

code(r'''
%matplotlib inline
import json
import os
from pathlib import Path

from IPython.display import Markdown, display

from cag import analysis, comparisons, figures, paper_tables, results
from cag.experiments import load_spec
from cag.listing import listing

os.chdir(analysis.repo_root())
folder = Path(results_dir)
rows = results.read_csv(folder / "summary.csv")
calibration = results.read_csv(folder / "calibration.csv")
calibration_classes = results.read_csv(folder / "calibration_classes.csv")
delta_rows = results.read_csv(folder / "delta_d.csv")
labels = results.read_csv(folder / "pseudo_labels.csv")
compared = results.read_csv(folder / "comparisons.csv")
calibration_runs = json.loads((folder / "calibration_runs.json").read_text())
runs = json.loads((folder / "runs.json").read_text())
declared = load_spec(experiment)["comparisons"]  # the list fixed before the run
for name, record in (("calibration", calibration_runs), ("benchmark", runs)):
    print(f"{name}: complete {record['complete']}, code commit {record['commit'][:7]}, "
          f"{len(record['runs'])} runs")
print(f"summary.csv: {len(rows)} rows, scored on split {runs['eval_split']!r}; "
      f"comparisons.csv: {len(compared)} comparisons")
# the columns of the mIoU tables below
ARM_COLUMNS = {"name": "arm", "mean": "mIoU (%)", "sd": "sd (points)", "n": "seeds"}
''', check=True)

md(r"""
## The benchmark

**Presets.** A preset weighs the five shift components (`cag.data.domain_shift`, `docs/data.md`
§7); its strength scales them all. `class` is the method's assumption: each class changes its
own colour and texture (with three look-alike pairs such as sidewalk painted like road), shapes
change and the optics blur, and there is no global colour change. `global` is the case
where the method's assumption does not hold: one colour map of the whole image, the kind of
shift that normalisation statistics and a global alignment are designed for; whether they undo
it is measured below. `full` has every component at once. The weights and the default
strengths that the calibration fixed:
""")

code(r'''
from cag.data.domain_shift import PRESETS

Markdown(results.markdown(
    [{"preset": name, **preset.weights._asdict(), "strength": preset.default_strength}
     for name, preset in PRESETS.items()],
    {"preset": "preset", "global_": "global", "material": "material", "geometry": "geometry",
     "layout": "layout", "optics": "optics", "strength": "default strength"}, digits=2))
''', check=True)

md(r"""
**Arms** (`configs/experiments/benchmark_v2.yaml`). Per seed, one source-only model is trained
on the source images (which do not depend on the preset). Two of its checkpoints are used: the
**last** one (iteration 16000), which the source-only and AdaBN rows report, and the one with
the best in-domain val mIoU (`best_val`: scored on val images generated with no shift, strength
0, i.e. the source's own domain; no label of a shifted target is read), which the warm-up and
the oracle start from; a cell below the `class` table prints both.

- **source-only**: that model, scored on each preset's target test split.
- **AdaBN**: the same model (last checkpoint) with its BatchNorm statistics re-estimated on the
  preset's target *train* images; no training, no label (`cag.adabn`).
- **warm-up**: the warm-up stage, our rebuild (the release ships no warm-up code;
  [chapter 3](03_source_only_warmup.ipynb)), started from the source-only model: source
  cross-entropy plus an output-space adversarial term (AdaptSegNet's: a discriminator learns to
  tell source from target segmentation maps, and the network is pushed to make its target maps
  look like source ones), with BatchNorm in train mode (its running mean and variance are
  updated by every batch it sees, source and target); its schedule is printed below.
  **Warm-up without the adversarial term**: the same stage with
  `warmup.lambda_adv=0`; it still passes the target batches through the network in train mode,
  so only the adversarial gradient is missing. In both, the BatchNorm running statistics end as
  a mixture of source and target batch statistics; AdaBN's are the target's alone.
- **CAG**, stages 1 to 3 from the warm-up model, each stage scored, with the release's loss
  settings ($\Delta_d = 2.5$, $\lambda = 0.7$, probability threshold 0.95, anchor and probability
  pseudo-labels averaged, SmoothL1 distance loss on per-image class means, anchors computed once
  from the warm-up model) and this benchmark's schedule (printed below: a new SGD optimiser each
  stage, restarted at the warm-up's learning rate; the release runs 62,412 iterations per stage
  at lr $10^{-4}$ with a 90,000-iteration poly horizon, `docs/paper-vs-code.md` rows 10 and 32).
- Four arms take a 2×2 factorial design, all four on/off combinations of the method's two
  additions to self-training: pseudo-labels (anchor and probability averaged, as released, or
  probability only) × the
  distance loss (on, or `cag.lam=0`). CAG is (both, on); **self-training** is (probability,
  off); the other two are *self-training with the distance loss* and *CAG without the distance
  loss*, and these two run stage 1 only (`cag.stages=1`): the factorial compares stage 1.
- The paper's two readings, each swapped in alone for all three stages
  (`docs/paper-vs-code.md` rows 2 and 3): anchor pseudo-labels only (`cag.pseudo_labels=anchor`)
  and the per-pixel L2 distance loss (`cag.distance_loss=pixel_l2`), the latter at the release's
  $\lambda = 0.7$: a weight set for the release's loss and not re-set for the per-pixel loss,
  whose values and gradients are on another scale ([chapter 6](06_losses.ipynb)). That arm asks
  about the paper's loss *at that weight*.
- **No-target-loss control**: the CAG stages with no target loss (no anchor pseudo-label passes
  a margin of $10^6$, and $\lambda = 0$): what the CAG stage schedule does without any target
  loss. What remains is source cross-entropy with target batches passing through BatchNorm in
  train mode, the learning rate restarted each stage, and no adversarial term.
- **Target-trained (oracle)**: the seed's source-only model (its `best_val` checkpoint, the one
  the warm-up also starts from) fine-tuned on the preset's target *train* labels only (2000
  iterations at lr 0.01, no source data, `oracle:` in the experiment files): a supervised
  reference for what the same network reaches with the target labels, not a bound on what an
  unsupervised method could reach. It differs from the usual oracle of the literature, which is
  trained on the target from an ImageNet backbone. At this scale there is no pretrained
  backbone to start from, and one trained from scratch would need the whole source-only
  schedule again per preset.
- On `class`, seeds 1-3 only: a $\Delta_d$ sweep and **long-stage CAG** (stages four times as long).

`class` runs every arm with five seeds; `global` and `full` run source-only, AdaBN, the warm-up,
CAG, self-training and the oracle with three seeds.

**Splits.** The calibration scores on target *val* only. The table is scored on the held-out target
*test* split, which no run reads for training, anchors, pseudo-labels or model selection. Inside
an arm, each stage starts from the previous stage's checkpoint with the best target-val mIoU, as
in the release (`train.select: best_val`). Here validation runs only at the end of the warm-up
and of each stage (`train.val_interval` is not shorter than them), so that checkpoint is always
the last one: no target label selects anything inside an adapted arm. The score of an arm is that
of its final stage's **last** checkpoint.

**Schedule.** The network is the project's tiny DeepLab-v3+ (`configs/synthetic_benchmark.yaml`).
Every stage seeds its data streams with the run's seed, so each stage of an arm sees the same
order of crops: the stages of an arm differ in their starting model and pseudo-labeller, not in
their data. The release does the same as far as its code shows: `train.py` seeds torch, CUDA,
NumPy and Python's `random` with one seed (1337 by default; its configuration sets none) at the
start of `train()` (lines 44-47 at commit `91a14a9`), and one launch trains one stage; that its
crop order then repeats was not checked by running it. The learning rate decays as
$\mathrm{lr}\,(1 - i/\mathrm{horizon})^{0.9}$ over iteration $i$. The schedule:
""")

code(r'''
from cag.config import load_config
from cag.loop import poly_lr

bench = load_config("configs/synthetic_benchmark.yaml")
batch, images = bench.train.batch_size, bench.data.synthetic.n_target_train
print(f"images {bench.data.synthetic.size[0]}x{bench.data.synthetic.size[1]}, "
      f"{bench.data.num_classes}-class label space (the generator renders 17: no train, no "
      f"motorcycle), batch {batch} source + {batch} target crops")
print(f"source-only {bench.source_only.iters} iterations at lr {bench.source_only.lr:g}; "
      f"warm-up {bench.warmup.iters} at lr {bench.warmup.lr:g} (lambda_adv "
      f"{bench.warmup.lambda_adv:g}, poly to 0 over its {bench.warmup.iters} iterations)")
stage_end_lr = poly_lr(bench.cag.lr, bench.cag.iters, bench.cag.poly_horizon,
                       bench.train.poly_power)
print(f"{bench.cag.stages} CAG stages of {bench.cag.iters} iterations, each restarting at lr "
      f"{bench.cag.lr:g} (poly horizon {bench.cag.poly_horizon}: it ends at {stage_end_lr:.4f})")
print(f"validation every {bench.train.val_interval} iterations")
print(f"one CAG stage = {bench.cag.iters * batch / images:g} passes over the {images} target "
      f"train images")
''', check=True)

md(r"""
### Reading a comparison

Each arm is trained once per seed, and within a seed every arm starts from the same source-only
model (every adapted arm from the same warm-up model) and sees the same data order. A comparison
of arm A with arm B therefore takes the difference **within each seed** first,
$d_s = \mathrm{mIoU}_A(s) - \mathrm{mIoU}_B(s)$: a seed effect shared by both arms (a good
source model lifting both) cancels in it; where the arms do not share it, pairing does not
narrow the interval. The comparison reports the
mean of the $n$ differences with its 95 % Student-t interval

$$
\bar d \;\pm\; t_{0.975,\,n-1}\,\frac{s_d}{\sqrt n},
\qquad \bar d = \frac1n \sum_s d_s,
\qquad s_d^2 = \frac{1}{n-1} \sum_s \big(d_s - \bar d\big)^2 .
$$

With so few seeds the spread $s_d$ is itself uncertain, hence Student's $t$ with $n-1$ degrees
of freedom instead of the normal quantile:
""")

code(r'''
from cag.comparisons import paired_difference, t_quantile

for n in (3, 5):
    print(f"n = {n} seeds: t_0.975,{n - 1} = {t_quantile(0.975, n - 1):.3f} (normal: 1.960)")
listing(paired_difference)
''', check=True)

md(r"""
An interval entirely above zero reads "A is better than B", entirely below "A is worse", and one
that contains zero "no detectable difference", which is not evidence that the two arms are the
same: with three or five seeds an interval is usually wide. Unless it is itself narrow: one from
−0.1 to 0.1 bounds the difference to a tenth of a point; one from −8 to 5 bounds nothing. The
sentences below are generated by
`verdict` from the interval; `results.say` adds the arms' readable names:
""")

code(r'''
from cag.comparisons import verdict

listing(verdict, results.say)
''', check=True)

md(r"""
## Calibration: the presets' strengths, on target val

The strength of each preset was fixed before any adaptation arm ran, on the target **val**
split (`configs/experiments/calibration_v2.yaml`), against the four aims below (`docs/data.md`
§7; the plateau aim is measured after the others, and the cells say whether it is yet): the
shift must leave room to adapt without being hopeless (source-only within a band of the
oracle's mIoU); BatchNorm statistics alone must not solve it (AdaBN closing at most a set share
of the gap from source-only to the oracle, on `class` and `full`); every class must be learnable
(the oracle's weakest class above a floor); and source-only must be trained to a plateau (a
model trained twice as long changes its val mIoU by less than a set amount). The thresholds, as
`cag.results` checks them:
""")

code(r'''
print(f"source-only / oracle in [{results.RATIO_BAND[0]:.2f}, {results.RATIO_BAND[1]:.2f}]")
print(f"AdaBN closure <= {results.MAX_CLOSURE:.2f} on {', '.join(results.CLOSURE_PRESETS)}")
print(f"oracle IoU >= {results.MIN_ORACLE_CLASS_IOU:.2f} on every class")
print(f"|source-only at 2x iterations - at 1x| < {results.MAX_PLATEAU_CHANGE:.1f} mIoU points")
''', check=True)

md(r"""
The ratio and the closure, as fractions (closure 1: AdaBN reaches the oracle; 0: it does
nothing); the calibration table computes them from the means over seeds:
""")

code(r'''
from cag.calibration import ratio_and_closure

listing(ratio_and_closure)
''', check=True)

md(r"""
Val mIoU (fractions), means over seeds, per preset and strength. The oracle was fine-tuned only
at the candidate strengths of `class` and `full`; `global` has no aim (it is the counter-example)
and its oracle is trained by the benchmark:
""")

code(r'''
Markdown(results.markdown(results.calibration_table(calibration),
                          {"preset": "preset", "strength": "strength", "source_only": "source-only",
                           "adabn": "AdaBN", "target_oracle": "oracle", "ratio": "ratio",
                           "closure": "closure", "n": "seeds", "n_oracle": "oracle seeds"}))
''', check=True)

md(r"""
The plateau check: a second source-only model per seed, trained twice as long, scored on the
same cells (change in mIoU points, over the seeds that have both):
""")

code(r'''
plateau = results.plateau_table(calibration)
if any(row["n"] for row in plateau):
    display(Markdown(results.markdown(plateau, {
        "preset": "preset", "strength": "strength", "source_iters": "iterations",
        "long_iters": "longer", "base": "val mIoU", "long": "val mIoU, longer",
        "change_points": "change (points)", "n": "seeds"})))
else:
    print(f"no seed has finished its longer source-only model yet (calibration_runs.json: "
          f"complete {calibration_runs['complete']})")
''', check=True)

md(r"""
The four aims at the default strength of each calibrated preset, with the oracle's weakest class
(per-class val IoU from `calibration_classes.csv`); a dash is an aim that was not measured:
""")

code(r'''
verdicts = [results.calibration_verdicts(calibration, calibration_classes, preset,
                                         PRESETS[preset].default_strength)
            for preset in ("class", "full")]  # the oracle_grid of calibration_v2.yaml
Markdown(results.markdown(verdicts, {
    "preset": "preset", "strength": "strength", "ratio": "ratio", "ratio_ok": "ratio ok",
    "closure": "closure", "closure_ok": "closure ok", "floor_class": "oracle's weakest class",
    "floor_iou": "its IoU", "floor_ok": "floor ok", "plateau_change": "plateau change (points)",
    "plateau_ok": "plateau ok", "all_ok": "all aims met"}))
''', check=True)

md("The same, in words (generated from the numbers above):")

code(r'''
for verdict in verdicts:
    print(results.calibration_sentence(verdict))
''', check=True)

code(r'''
figures.plot_calibration(calibration)
''', alt="One panel per preset: mean val mIoU of source-only, AdaBN and the target-trained model "
        "against the shift strength, source-only trained twice as long drawn hollow where the "
        "plateau check has run, and a shaded band where source-only should lie relative to the "
        "oracle; the oracle and the band only at the strengths where the oracle was trained "
        "(none on global).",
     caption="Calibration on target val: source-only, AdaBN and the oracle against the strength.",
     name="fig-results-calibration")

md(r"""
## The table: mIoU per arm on the held-out test split

Mean and sample standard deviation over seeds of the test mIoU (%), last checkpoint. The last
checkpoint is the headline for every adapted arm because choosing one of its checkpoints by
target-val mIoU would use target labels, which an unsupervised method does not have. For
source-only, `best_val` is chosen on source-domain val (no target label) and is the checkpoint
the warm-up and the oracle start from; a cell after this table repeats the comparisons with
source-only and AdaBN at it. `summary.csv` holds a `best_val` row only
where it differs from `last`. The warm-ups and the CAG stages validate once, at their end, so
theirs never differs; source-only, AdaBN and the oracle validate several times. A difference of
two means in these tables is not a comparison: the
paired intervals of the next section are.

**`class`**, the shift the method is built for:
""")

code(r'''
Markdown(results.markdown(results.miou_table(rows, "class"), ARM_COLUMNS, digits=1,
                          percent=("mean", "sd")))
''', check=True)

md(r"""
The source-only model the warm-up and the oracle start from is its `best_val` checkpoint, not the
`last` one in the table above (AdaBN is applied to `last`); the two, on the same seeds, and the
comparisons with them repeated at `best_val` (where an arm has no distinct `best_val` row, its
`last` stands in; checkpoint-matched, not declared):
""")

code(r'''
for checkpoint in ("last", "best_val"):
    (entry,) = results.miou_table(rows, "class", checkpoint, arms=["source_only"])
    print(f"source-only, {checkpoint} checkpoint: {100 * entry['mean']:.1f} "
          f"(seeds {' '.join(map(str, entry['seeds']))})")
MATCHED = [("adabn", "source_only"), ("warmup", "source_only"), ("warmup", "adabn"),
           ("cag_stage3", "adabn")]
for preset in ("class", "global", "full"):
    matched = results.undeclared_comparisons(rows, declared, preset, MATCHED, checkpoint="best_val")
    for row in matched:
        print(f"[checkpoint-matched, not declared] {preset}: "
              + results.say(matched, preset, row["arm_a"], row["arm_b"], "best_val"))
''', check=True)

md("**`full`**, every shift component at once:")

code(r'''
Markdown(results.markdown(results.miou_table(rows, "full"), ARM_COLUMNS, digits=1,
                          percent=("mean", "sd")))
''', check=True)

md("**`global`**, where the method's assumption does not hold:")

code(r'''
Markdown(results.markdown(results.miou_table(rows, "global"), ARM_COLUMNS, digits=1,
                          percent=("mean", "sd")))
''', check=True)

md(r"""
On `class`, every arm at its final stage (stage 1 for the two factorial cells that run one stage;
long-stage CAG, which has three seeds, left out), each seed a dot:
""")

code(r'''
# the two factorial cells that run stage 1 only (benchmark_v2.yaml) at their stage 1
FINAL_ARMS = ("source_only", "adabn", "warmup", "warmup_no_adv", "cag_stage3",
              "self_training_stage3", "self_training_distance_stage1", "cag_no_distance_stage1",
              "cag_anchor_only_stage3", "cag_pixel_l2_stage3", "no_target_losses_stage3",
              "target_oracle")
figures.plot_arms(rows, "class", arms=FINAL_ARMS)
''', alt="Bar chart of test mIoU on the class preset, one bar per arm at its final stage at the "
        "mean over seeds with one dot per seed, from source-only through the adapted arms to the "
        "target-trained model.",
     caption="Preset class: test mIoU of every arm but long-stage CAG at its final stage, mean and "
             "each seed.",
     name="fig-results-arms")

md(r"""
## The questions

Each question is one or more of the comparisons declared in `benchmark_v2.yaml`, on `class`
(five seeds unless stated) until the `global` and `full` sections. Under each question, the
cell prints the answer generated from the interval.

### Do target BatchNorm statistics alone help?

AdaBN changes nothing but the BatchNorm statistics (applied to the source-only model's last
checkpoint). Its comparison with source-only gives the change in mIoU points on test. The
calibration limited AdaBN's *share* of the source-only → oracle gap on val (above); the share
on test can be read from the table above, but it is not a declared comparison.
""")

code(r'''
print(results.say(compared, "class", "adabn", "source_only"))
''', check=True)

md(r"""
### The warm-up against source-only and against AdaBN

The warm-up passes target batches through the network in train mode, so its BatchNorm running
statistics become a mixture of source and target batch statistics (AdaBN's are target-only).
Against source-only it measures the whole warm-up; against AdaBN, whether the warm-up differs
from re-estimating the statistics alone. Both read source-only's and AdaBN's last checkpoint,
while the warm-up starts from `best_val` (the offset is printed with the table above).
""")

code(r'''
for arm_a, arm_b in (("warmup", "source_only"), ("warmup", "adabn")):
    print(results.say(compared, "class", arm_a, arm_b))
''', check=True)

md(r"""
### Does the adversarial term matter?

The warm-up without the adversarial term has the same schedule, data and target batches; only
the adversarial gradient is missing. Does the adversarial term change the result, or does the
warm-up amount to more source training with target batches through BatchNorm?
""")

code(r'''
print(results.say(compared, "class", "warmup", "warmup_no_adv"))
''', check=True)

md(r"""
### CAG against the warm-up it starts from

Every CAG arm starts from the warm-up model. Stage 1 against the warm-up is how one CAG stage
changes the warm-up model; stage 3 against the warm-up, how the whole schedule changes it;
stage 3 against AdaBN, whether the method as a whole differs from target BatchNorm statistics
alone.
""")

code(r'''
for arm_a, arm_b in (("cag_stage1", "warmup"), ("cag_stage3", "warmup"), ("cag_stage3", "adabn")):
    print(results.say(compared, "class", arm_a, arm_b))
''', check=True)

md(r"""
### CAG against self-training, stage by stage

Self-training is CAG without either of its two category-anchor components: the same stages with
probability pseudo-labels only and no distance loss. This comparison asks whether the anchors
change the result of self-training. Read it next to each arm's difference from the warm-up
(CAG's is declared above; self-training's is exploratory, below): if both arms end below the
warm-up, "better" means "lost less"; if both end above, "gained more". After each stage:
""")

code(r'''
for k in (1, 2, 3):
    print(results.say(compared, "class", f"cag_stage{k}", f"self_training_stage{k}"))
''', check=True)

md(r"""
The five three-stage arms that run on every seed (long-stage CAG, seeds 1-3 only, has its own
section), per stage (stage 0 is the warm-up model they all start from): mean with the
half-width of its own 95 % interval over seeds. These per-arm intervals carry the
seed effect that the paired intervals remove: whether two of them overlap is not the
comparison. The figure after the table therefore plots each arm's *paired* difference from the
warm-up instead (`results.stage_differences`; of these, only CAG's stages 1 and 3 and the
control's stage 3 are declared comparisons, the rest are descriptions).
""")

code(r'''
STAGE_ARMS = ("cag", "self_training", "cag_anchor_only", "no_target_losses", "cag_pixel_l2")
Markdown(results.markdown(results.stage_table(rows, "class", STAGE_ARMS),
                          {"name": "arm", "stage": "stage", "mean": "mIoU (%)",
                           "half_ci": "95 % CI half-width (points)", "n": "seeds"},
                          digits=1, percent=("mean", "half_ci")))
''', check=True)

code(r'''
figures.plot_stage_differences(rows, "class", STAGE_ARMS)
''', alt="Line plot of each arm's paired difference from the warm-up model in mIoU points against "
        "the CAG stage (warm-up at 0, then 1, 2, 3) on the class preset for CAG, self-training, "
        "anchor-only CAG, the no-target-loss control and pixel-L2 CAG, means over seeds with "
        "paired 95 percent interval bars and a line at 0.",
     caption="Preset class: each three-stage arm minus the warm-up model it starts from, per stage "
             "(paired within each seed; descriptive except CAG's stages 1 and 3 and the control's "
             "stage 3).",
     name="fig-results-stages")

md(r"""
### Stage 3 against stage 1

The release runs three stages, each with a pseudo-labeller refreshed from the previous stage's
model; the anchors stay those of the warm-up model (as released, `anchors.recompute_per_stage:
false`). Does stage 3 end above or below stage 1, for CAG and for self-training?
""")

code(r'''
for arm in ("cag", "self_training"):
    print(results.say(compared, "class", f"{arm}_stage3", f"{arm}_stage1"))
''', check=True)

md(r"""
### The two ingredients: a 2×2 factorial at stage 1

CAG adds two things to probability self-training: anchor pseudo-labels (averaged with the
probability ones, as released) and the distance loss. The four combinations after stage 1,
means over the five seeds:
""")

code(r'''
design = {"cag_stage1": ("anchor + probability", "on"),
          "cag_no_distance_stage1": ("anchor + probability", "off"),
          "self_training_distance_stage1": ("probability", "on"),
          "self_training_stage1": ("probability", "off")}
table = results.miou_table(rows, "class", arms=design)
Markdown(results.markdown(
    [{**t, "labels": design[t["arm"]][0], "loss": design[t["arm"]][1]} for t in table],
    {"labels": "pseudo-labels", "loss": "distance loss", **ARM_COLUMNS}, digits=1,
    percent=("mean", "sd")))
''', check=True)

md(r"""
The declared contrasts: the distance loss with each kind of pseudo-labels (first two lines), and
the anchor pseudo-labels without and with the distance loss (last two). Whether the factors
interact is the difference between a factor's two contrasts, which was not declared: one
"better" beside one "no detectable difference" is not evidence of an interaction. All four
cells start from the warm-up model, and CAG stage 1 ends below it (above): a positive contrast
here can be a smaller loss. Each cell's difference from the warm-up is in the exploratory
section.
""")

code(r'''
for arm_a, arm_b in (("cag_stage1", "cag_no_distance_stage1"),
                     ("self_training_distance_stage1", "self_training_stage1"),
                     ("cag_no_distance_stage1", "self_training_stage1"),
                     ("cag_stage1", "self_training_distance_stage1")):
    print(results.say(compared, "class", arm_a, arm_b))
''', check=True)

md(r"""
### The paper's readings against the release's

The paper, as its abstract and poster describe it (not checked against its full text,
`docs/method.md` §0 and §5.2), uses anchor pseudo-labels alone and a pixel-level L2 distance
loss; the release
averages the anchor and probability cross-entropies and uses a SmoothL1 loss on per-image class
means (`docs/paper-vs-code.md` rows 2 and 3, [chapter 6](06_losses.ipynb)). Each reading
replaces the release's, alone, for all three stages. Read each difference next to each arm's
own difference from the warm-up (the stage figure above and the exploratory section): two arms
that both start from the warm-up can differ because one lost less.
""")

code(r'''
for arm in ("cag_anchor_only", "cag_pixel_l2"):
    print(results.say(compared, "class", f"{arm}_stage3", "cag_stage3"))
''', check=True)

md(r"""
### The target losses against the same schedule without them

The no-target-loss control runs the CAG stages with no target loss: what remains is continued
source training with target batches in train mode. CAG against it (after stage 1 and after
stage 3) asks how the target losses change the result of the same schedule; the control against
the warm-up, how the schedule without target losses changes the warm-up model. Read the first
with the second: a positive CAG − control can mean that the target losses prevent a decline
rather than improve on the start.
""")

code(r'''
for arm_a, arm_b in (("cag_stage1", "no_target_losses_stage1"),
                     ("cag_stage3", "no_target_losses_stage3"),
                     ("no_target_losses_stage3", "warmup")):
    print(results.say(compared, "class", arm_a, arm_b))
''', check=True)

md(r"""
### CAG against the target-trained model

The oracle is the seed's source-only model fine-tuned on the target train labels. The paired
difference below is the difference between that supervised reference and CAG after stage 3, on
the same seeds; it is not the room left for an unsupervised method (the oracle is not a bound).
""")

code(r'''
print(results.say(compared, "class", "target_oracle", "cag_stage3"))
''', check=True)

md(r"""
### The counter-example, `global`, and everything at once, `full`

On `global` a single colour map of the whole image separates the domains: the shift that
BatchNorm statistics and a global alignment are designed for. The questions are whether AdaBN
and the warm-up change source-only's result, whether the warm-up differs from AdaBN, and
whether the CAG stages then change the warm-up's result. `full` asks the same questions with
every shift component present. The comparisons declared on each preset, three seeds each:
""")

code(r'''
for preset in ("global", "full"):
    print(f"{preset}:")
    shown = [row for row in compared if row["preset"] == preset]
    for row in shown:
        print("  " + results.say(compared, preset, row["arm_a"], row["arm_b"]))
    if not shown:
        print("  no comparison in these results files yet")
''', check=True)

md(r"""
How much AdaBN changes each preset, as the calibration measured it on val (above) but now on
test: the share of the source-only → oracle gap it closes, computed from the table's means
(descriptive, not a declared comparison):
""")

code(r'''
for preset in ("class", "global", "full"):
    arms = ["source_only", "adabn", "target_oracle"]
    means = {t["arm"]: t["mean"] for t in results.miou_table(rows, preset, arms=arms)}
    _, closure = ratio_and_closure(means["source_only"], means["adabn"], means["target_oracle"])
    print(f"{preset}: AdaBN closes {closure:.0%} of the gap on test")
''', check=True)

md(r"""
The comparisons on `global` and `full` that the opening question turns on, gathered (each
printed above); on `global`, read them with the Bonferroni cell below, which says how many
survive at the level of its whole family of twelve:
""")

code(r'''
PRESET_DIGEST = {
    "global": [("adabn", "source_only"), ("warmup", "adabn"), ("cag_stage3", "warmup"),
               ("cag_stage3", "adabn"), ("cag_stage3", "self_training_stage3")],
    "full": [("warmup", "source_only"), ("cag_stage3", "warmup"),
             ("cag_stage3", "self_training_stage3")]}
for preset, pairs in PRESET_DIGEST.items():
    print(f"{preset}:")
    for arm_a, arm_b in pairs:
        print("  " + results.say(compared, preset, arm_a, arm_b))
''', check=True)

md(r"""
### All comparisons at once

Every declared comparison, arm A − arm B in mIoU points with its 95 % interval (green: above
zero; red: below; grey: contains zero):
""")

code(r'''
figures.plot_comparisons(compared)
''', alt="Forest plot with one row per declared comparison on the three presets: the mean paired "
        "difference in mIoU points with its 95 percent interval, coloured by whether the "
        "interval lies above zero, below zero or contains zero.",
     caption="Every declared comparison: paired differences within each seed, 95 % intervals "
             "(green: arm A above arm B, which is not arm A above the model it started from).",
     name="fig-results-comparisons")

code(r'''
print(comparisons.count_sentence(compared, complete=runs["complete"]))
''', check=True)

md(r"""
Read the count as a scale, not as a test: many comparisons share an arm and all share the
seeds, so their intervals are not independent, and each comparison's 95 % is its own, not that
of the family. A stricter reading widens each interval until the whole family of a preset's $m$
declared comparisons holds at 95 % together (Bonferroni: level $1 - 0.05/m$ each, conservative
when the comparisons are dependent); the comparisons whose interval then contains zero:
""")

code(r'''
for preset in ("class", "global", "full"):
    family = results.bonferroni(rows, compared, preset)
    if not family:
        continue
    lost = [r for r in family if r["excludes_zero"] and not r["excludes_zero_family"]]
    each = sum(r["excludes_zero"] for r in family)
    together = sum(r["excludes_zero_family"] for r in family)
    print(f"{preset}: {len(family)} declared comparisons, {each} exclude zero at 95 % each, "
          f"{together} at the family level; no longer excluding zero:")
    for row in lost:
        print(f"  {results.arm_name(row['arm_a'])} - {results.arm_name(row['arm_b'])}: "
              f"{100 * row['ci_low']:.1f} to {100 * row['ci_high']:.1f} points")
    if not lost:
        print("  none")
''', check=True)

md(r"""
With five seeds every interval rests on the Student-t model: a test that assumes no
distribution, such as the exact sign-flip test over seeds, cannot reach $p < 0.05$ with five
paired differences (its smallest two-sided $p$ is $2/2^5 = 0.0625$), even when all five agree in
sign; with three seeds (`global`, `full`) it is $2/2^3 = 0.25$. The comparisons of CAG with
self-training at stages 1-3 follow one trajectory: they are not three independent
confirmations.

## Exploratory: every adapted arm against the warm-up, and a few pairs besides

**Not declared.** The comparisons of this section were chosen after results had been seen:
each arm against the warm-up after the means of the partial table (`class`, seeds 1-3), the
factorial cells, long-stage CAG and anchor-only CAG against other arms after the complete
`class` table. They were picked because of what those means showed, so they cannot confirm
it: they are not in `comparisons.csv`, not in the count above, and they
test nothing; they describe, with the same paired intervals, how far each arm moves from the
model it starts from. The pairs the experiment file declares (CAG stages 1 and 3 and the
control's stage 3 against the warm-up) are left out: their answers are above.
`results.undeclared_comparisons` computes the others from `summary.csv`:
""")

code(r'''
EXPLORATORY = [(f"{arm}_stage{k}", "warmup") for arm in STAGE_ARMS for k in (1, 2, 3)]
EXPLORATORY += [("cag_no_distance_stage1", "warmup"), ("self_training_distance_stage1", "warmup"),
                ("cag_long_stage3", "warmup"),  # the factorial's cells and long stages vs the start
                ("cag_anchor_only_stage1", "cag_stage1"),
                ("cag_anchor_only_stage3", "self_training_stage3"),
                ("warmup_no_adv", "adabn")]  # the warm-up without its adversarial term vs AdaBN
exploratory = results.undeclared_comparisons(rows, declared, "class", EXPLORATORY)
print(f"{len(exploratory)} exploratory comparisons on class (not declared):")
for row in exploratory:
    print("  [exploratory] " + results.say(exploratory, "class", row["arm_a"], row["arm_b"]))
''', check=True)

code(r'''
figures.plot_comparisons(exploratory, "class",
                         title="Exploratory (not declared): paired differences on preset class")
''', alt="Forest plot with one row per exploratory comparison on the class preset: each adapted "
        "arm at each stage minus the warm-up (except the three pairs the experiment file "
        "declares), anchor-only CAG against CAG at stage 1 and against self-training at stage 3, "
        "and the warm-up without its adversarial term minus AdaBN, mean paired difference in "
        "mIoU points with its 95 percent interval.",
     caption="Exploratory (not declared): each arm's paired difference from the warm-up model, "
             "per stage.", name="fig-results-exploratory")

md(r"""
## What the `class` table shows

The comparisons the opening question turns on, gathered in one place; each line is printed
from its interval above (declared) or in the exploratory section (marked). Whatever they say,
they hold for this benchmark, at these settings and this schedule (the limits at the end of the
chapter):
""")

code(r'''
DIGEST = [("warmup", "source_only"), ("warmup", "warmup_no_adv"),
          ("cag_stage1", "warmup"), ("cag_stage3", "warmup"),
          ("cag_stage3", "self_training_stage3"), ("self_training_stage3", "warmup"),
          ("cag_stage1", "cag_no_distance_stage1"),
          ("cag_no_distance_stage1", "self_training_stage1"),
          ("cag_anchor_only_stage3", "cag_stage3"), ("cag_anchor_only_stage3", "warmup"),
          ("cag_stage1", "no_target_losses_stage1"), ("cag_stage3", "no_target_losses_stage3"),
          ("no_target_losses_stage3", "warmup")]
for arm_a, arm_b in DIGEST:
    if any(row["arm_a"] == arm_a and row["arm_b"] == arm_b for row in exploratory):
        print("[exploratory] " + results.say(exploratory, "class", arm_a, arm_b))
    else:
        print(results.say(compared, "class", arm_a, arm_b))
''', check=True)

md(r"""
## Per class

Per-class test IoU (%), mean over seeds, on `class`, for the arms the questions above turn on
and two of their controls. No per-class comparison was declared: this table shows, class by
class, where the arms' mIoU come from; it tests nothing.
""")

code(r'''
CLASS_ARMS = ("source_only", "adabn", "warmup", "cag_stage3", "self_training_stage3",
              "target_oracle")
TABLE_ARMS = CLASS_ARMS[:3] + ("warmup_no_adv", "no_target_losses_stage3") + CLASS_ARMS[3:]
Markdown(results.markdown(results.per_class_table(rows, "class", TABLE_ARMS),
                          {"class": "class", **{arm: results.arm_name(arm) for arm in TABLE_ARMS}},
                          digits=1, percent=TABLE_ARMS))
''', check=True)

code(r'''
figures.plot_per_class_iou(rows, "class", CLASS_ARMS)
''', alt="Grouped bar chart of per-class test IoU on the class preset, one group per class and "
        "one bar per arm: source-only, AdaBN, warm-up, CAG stage 3, self-training stage 3 and "
        "the target-trained model.",
     caption="Preset class: per-class test IoU, mean over seeds.", name="fig-results-per-class")

md(r"""
### The pseudo-labels

The frozen pseudo-labeller of each stage (the warm-up model for stage 1, the previous stage's
model after that) labels the target *train* split; against its ground truth, which no training
reads, `pseudo_labels.csv` counts per class the **precision** of the assigned labels, their
**recall** (share of a class's pixels that get the right label) and **coverage** (share that get
any label). Both rules are measured on the labellers of both arms (CAG trains on both,
self-training on the probability rule only), pooled over classes and seeds, `class`. Pooled
pixels are dominated by the large classes (road, building, vegetation, sky), and the labellers
of the anchor-only arm were not measured (`pseudo_label_arms` in the experiment file):
""")

code(r'''
quality = [{"arm": results.arm_name(arm), "rule": rule, **entry}
           for arm in ("cag", "self_training") for rule in ("anchor", "probability")
           for entry in results.pseudo_label_overall(labels, "class", arm, rule)]
Markdown(results.markdown(quality, ["arm", "rule", "stage", "precision", "recall", "coverage"],
                          digits=1, percent=("precision", "recall", "coverage")))
''', check=True)

md(r"""
## $\Delta_d$ as a fraction of the smallest anchor gap

A target pixel gets an anchor pseudo-label when its nearest anchor is closer than the
second-nearest by at least $\Delta_d$ ([chapter 5](05_pseudo_labels.ipynb)). By the triangle
inequality a pixel's margin can never exceed the distance between its nearest anchor and that
anchor's closest neighbour, so $\Delta_d$ means something only relative to the gaps between the
anchors: a $\Delta_d$ above the smallest gap leaves the two closest classes without a single
active pixel, whatever the features. The sweep therefore sets $\Delta_d$ to a fraction of each
seed's smallest anchor gap (of the warm-up model's anchors):
""")

code(r'''
from cag.benchmark_table import delta_d_value
from cag.pseudo_labels import smallest_anchor_gap

listing(smallest_anchor_gap, delta_d_value)
''', check=True)

md("Each seed's smallest gap, and where the release's fixed $\\Delta_d$ falls on it:")

code(r'''
gaps = {r["seed"]: r["smallest_gap"] for r in delta_rows if r["preset"] == "class"}
for seed, gap in sorted(gaps.items()):
    print(f"seed {seed}: smallest anchor gap {gap:.3f}; the release's Delta_d = "
          f"{bench.cag.delta_d:g} is {bench.cag.delta_d / gap:.2f} of it")
''', check=True)

md(r"""
At each fraction, means over seeds: the share of target-train pixels that get an anchor
pseudo-label at stage 1 and its precision, and the test mIoU after stage 1. No comparison was
declared on the sweep (three seeds): it describes how coverage, precision and mIoU vary with
$\Delta_d$; it tests nothing.
""")

code(r'''
Markdown(results.markdown(results.delta_d_table(delta_rows, stage=1, preset="class"),
                          {"fraction": "fraction of the gap", "delta_d": "Delta_d (mean)",
                           "active_fraction": "active pixels (%)",
                           "active_precision": "precision (%)", "miou": "mIoU (%)", "n": "seeds"},
                          digits=1, percent=("active_fraction", "active_precision", "miou")))
''', check=True)

code(r'''
figures.plot_delta_d(delta_rows, stage=1, preset="class")
''', alt="Two panels against Delta_d as a fraction of the smallest anchor gap: left, the share of "
        "target-train pixels with an anchor pseudo-label at stage 1 and its precision; right, "
        "test mIoU after each CAG stage.",
     caption="The Delta_d sweep on the class preset, means over seeds.", name="fig-results-delta-d")

md(r"""
## Stage length

A CAG stage of this benchmark is short (printed at the top of the chapter). Long-stage CAG runs
each stage four times as long, with the poly schedule's horizon scaled alike, on seeds 1-3. Does
it end stage 3 elsewhere than CAG on the same seeds?
""")

code(r'''
print(results.say(compared, "class", "cag_long_stage3", "cag_stage3"))
''', check=True)

md(r"""
## The paper's tables, for scale

The published numbers, quoted as printed, on real data with a ResNet-101 DeepLab-v3+ (GTA5) and
the 13-class SYNTHIA protocol. They come from the NeurIPS poster shipped in the release
(`QimingZHANG-NIPS_UDA.pdf`), transcribed earlier and not re-read; the paper's own tables were
not checked against its text (`docs/method.md` §0). They are **not** comparable with the
benchmark's numbers (another task, network and scale), and they were selected on the
validation set they report. They are here so that a reader sees the claim whose ingredients
this chapter examines on other data.
""")

code(r'''
Markdown(paper_tables.paper_table(paper_tables.PAPER_GTA5))
''', check=True)

code(r'''
Markdown(paper_tables.paper_table(paper_tables.PAPER_SYNTHIA13))
''', check=True)

code(r'''
paper = paper_tables.PAPER_GTA5["rows"]
print(f"CAG-UDA (poster) over the source-only row: "
      f"{paper['CAG-UDA'][-1] - paper['Source only'][-1]:.1f} points, over BLF: "
      f"{paper['CAG-UDA'][-1] - paper['BLF (BDL)'][-1]:.1f}; its per-class values average "
      f"{sum(paper['CAG-UDA'][:-1]) / 19:.2f} against the printed {paper['CAG-UDA'][-1]:.1f}")
''', check=True)

md(r"""
Read with care: the poster's "Source only" row may be AdaptSegNet's DeepLab-v2 baseline rather
than a source-only DeepLab-v3+ (the poster does not say which network it is; an inference, not
checked against the paper's text), so part of the gap printed above may be the network; and
the CAG-UDA row's per-class values do not average to its printed mIoU (the last two numbers
above). The poster's tables (as transcribed) report neither AdaBN nor a self-training baseline from
the same warm-up, the comparisons this chapter asks first.

## What this benchmark can and cannot say

- **Synthetic data, one draw.** The shift is built to match the method's assumption (`class`)
  or to contradict it (`global`), and `full` mixes both; a result here says what the method
  does on this generator,
  at one strength per preset, when its assumption holds or fails by construction, not what it
  does on GTA5 → Cityscapes. [Chapter 9](09_real_data.ipynb) gives the recipes for that. Each
  preset has one generated dataset (600 target train, 200 val, 300 test images) shared by all
  seeds: the intervals cover training randomness only, conditional on that dataset; they say
  nothing about another draw of the generator or another strength.
- **A small network.** The tiny DeepLab-v3+ has low-dimensional features on a small map; the
  anchors, their gaps and the margins live on that scale, not on the release's ResNet-101
  features.
- **A short schedule.** A CAG stage here is a few passes over the target train images (printed
  at the top), against the release's 84 passes over Cityscapes train per stage
  (`configs/adaptation_from_gta_to_city.yml:64` and `train.py:92` at commit `91a14a9`;
  `docs/paper-vs-code.md` row 10). The stage-length comparison asks whether a longer stage changes the answer on this
  benchmark; it cannot extrapolate to the release's length.
- **Source-only may be short of its plateau.** The calibration's plateau aim is printed above;
  where it fails or is unmeasured, the source-only model the other arms start from may not be
  converged: the last probe before the calibration (seed 1, `results/README.md`) still gained 1
  to 5 val points from 8000 to 16000 iterations. Part of any arm's difference from source-only
  can be further source training; `warmup_no_adv` controls for that within the warm-up, on
  `class` only.
- **Settings not tuned for this scale.** $\Delta_d$, $\lambda$ and the probability threshold are
  the release's values, and $\lambda_{adv} = 0.01$ is ProDA's warm-up value (the release ships
  no warm-up; `docs/method.md` §6), all applied to the 64-dimensional features of a tiny
  network. The stage learning rate equals the warm-up's (printed above), where the release's
  stages run at $10^{-4}$ for every parameter (`docs/paper-vs-code.md` row 32); pixel-L2 keeps a
  $\lambda$ set for another loss. Every comparison holds "at these settings". No adaptation
  setting was tuned; the source-only schedule (lr 0.04, 16000 iterations) was chosen by probes
  scored on target val, before any adaptation arm ran (`results/README.md`).
- **The warm-up is a reconstruction** (the release does not ship one; BatchNorm in train mode,
  BCE discriminator, $\lambda_{adv} = 0.01$). Every adapted arm starts from it, so every
  conclusion about the stages is conditional on it.
- **Evaluation-time BatchNorm statistics.** The trained arms are evaluated with running
  statistics that mix source and target batches, AdaBN with the target's alone: arms differ in
  their statistics as well as in their weights.
- **Compute is not matched.** CAG stage 3 has trained 500 + 3 × 300 iterations since
  source-only, the warm-up 500. No arm continues the warm-up (with its adversarial term) for
  the same number of iterations, so "a stage against the warm-up" mixes the target losses with
  more iterations at a restarted learning rate and the end of the adversarial term; the
  no-target-loss control separates only the first of these. The arm that would separate the
  others (the warm-up continued for 3 × 300 iterations with its adversarial term) was not run.
- **Classes no unsupervised arm learns.** A class that stays near 0 IoU for every arm without
  target labels (the per-class table shows which; in this table traffic sign and bus, against
  the oracle's 73 and 91) adds about the same to each such arm's mIoU: differences between those
  arms come from the other classes.
- **The factorial is stage 1 only.** It says nothing about the two ingredients at stages 2-3.
- **Few seeds, many comparisons.** Each interval covers its own comparison at 95 %; across all
  of them some intervals exclude zero by chance alone (the count above), and "no detectable
  difference" with three or five seeds leaves room for differences the benchmark cannot
  resolve. On `global` and `full` (three seeds, $t_{0.975,2} = 4.30$ against $t_{0.975,4} = 2.78$)
  an interval is about 1.5 times wider for the same spread of per-seed differences: some are
  tens of points wide, while pairs whose per-seed differences agree stay narrow even there. The
  comparisons were declared before the run, and none was added to the
  declared list after seeing the table; the exploratory section's comparisons were chosen
  after, and are labelled so.
""")


# ----------------------------------------------------------------------------- writing


def build(banner: bool = True) -> nbformat.NotebookNode:
    """The chapter's notebook, with the draft banner first when ``banner``."""
    nb = new_notebook()
    nb.metadata = {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python",
                                  "name": "python3"},
                   "language_info": {"name": "python"}}
    for index, (kind, text, meta) in enumerate(CELLS, start=1):
        cell = new_markdown_cell(text) if kind == "markdown" else new_code_cell(text)
        cell.metadata.update(meta)
        cell.id = f"cell-{index:02d}"  # stable ids: a rewrite changes only what changed
        if cell.cell_type == "code":
            long = [line for line in cell.source.splitlines() if len(line) > MAX_LINE]
            if long:
                raise SystemExit(f"code line over {MAX_LINE} characters: {long[0]!r}")
        nb.cells.append(cell)
    if banner:
        nb.cells.insert(0, new_markdown_cell(BANNER, id="cell-00"))
    nbformat.validate(nb)
    return nb


def write(path: Path = NOTEBOOK, banner: bool = True) -> Path:
    nbformat.write(build(banner), path)
    return path


def execute(results_dir: str, out: Path = NOTEBOOK, banner: bool = True) -> Path:
    """Run the chapter on ``results_dir`` into ``out``; drop papermill's injected cell (it would
    pin the path). ``out`` is replaced only when every cell ran."""
    sys.path.insert(0, str(REPO))
    from cag import book

    with tempfile.TemporaryDirectory() as scratch:
        source = write(Path(scratch) / out.name, banner)
        book.execute(source, out, parameters={"results_dir": results_dir}, cwd=REPO)
    nb = nbformat.read(out, as_version=4)
    nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    nbformat.write(book.clean_notebook(nb), out)
    return out


# ----------------------------------------------------------------------------- placeholder data


def fake(out: Path) -> None:
    """Placeholder results files in ``out`` (formats of cag.calibration and cag.benchmark_table;
    values made up)."""
    import os

    import numpy as np

    os.chdir(REPO)
    from cag import benchmark_table, comparisons
    from cag.calibration import CALIBRATION_CLASS_KEYS, CALIBRATION_KEYS, ratio_and_closure
    from cag.experiments import PSEUDO_LABEL_KEYS, SUMMARY_KEYS, load_spec, write_csv, write_runs
    from cag.labels import class_names

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2019)
    names = list(class_names(19))
    present = [n for n in names if n not in ("train", "motorcycle")]
    small = {"pole", "traffic light", "traffic sign", "person", "rider", "bicycle"}
    look_alike = {"sidewalk", "terrain", "bus"}
    oracle_iou = {n: (0.45 if n in small else 0.78) + rng.uniform(-0.08, 0.12) for n in present}
    share = {n: (0.01 if n in small else 0.08) * rng.uniform(0.6, 1.4) for n in present}

    def source_iou(preset: str) -> dict:
        keep = {"class": 0.5, "full": 0.55, "global": 0.45}[preset]
        return {n: oracle_iou[n] * (0.25 if n in look_alike and preset != "global" else keep)
                * rng.uniform(0.8, 1.2) for n in present}

    progress = {
        "class": {"source_only": 0, "adabn": .22, "warmup": .28, "warmup_no_adv": .26,
                  "cag": (.42, .46, .47), "self_training": (.40, .43, .44),
                  "self_training_distance": (.41, .44, .45), "cag_no_distance": (.40, .44, .45),
                  "cag_anchor_only": (.36, .39, .39), "cag_pixel_l2": (.43, .46, .48),
                  "no_target_losses": (.29, .30, .30), "cag_long": (.45, .49, .50),
                  "target_oracle": 1},
        "global": {"source_only": 0, "adabn": .75, "warmup": .78, "cag": (.74, .72, .71),
                   "self_training": (.75, .73, .72), "target_oracle": 1},
        "full": {"source_only": 0, "adabn": .30, "warmup": .35, "cag": (.45, .48, .49),
                 "self_training": (.44, .47, .48), "target_oracle": 1},
    }
    seeds = {"class": [1, 2, 3, 4, 5], "global": [1, 2, 3], "full": [1, 2, 3]}
    summary = []
    for preset, arms in progress.items():
        base = source_iou(preset)
        seed_effect = {s: rng.normal(0, 0.02) for s in seeds[preset]}
        for arm, value in arms.items():
            stages = value if isinstance(value, tuple) else (value,)
            arm_seeds = [1, 2, 3] if arm == "cag_long" else seeds[preset]
            for k, p in enumerate(stages, start=1):
                label = f"{arm}_stage{k}" if isinstance(value, tuple) else arm
                for seed in arm_seeds:
                    noise = rng.normal(0, 0.012)
                    ious = {n: float(np.clip(base[n] + p * (oracle_iou[n] - base[n])
                                             + seed_effect[seed] + noise + rng.normal(0, 0.03),
                                             0, 1)) for n in present}
                    row = {"preset": preset, "arm": label, "seed": seed, "checkpoint": "last",
                           "miou": float(np.mean(list(ious.values()))), **ious}
                    summary.append(row)
                    if arm not in ("source_only", "adabn"):
                        jitter = rng.normal(0.002, 0.004)
                        summary.append({**row, "checkpoint": "best_val", "miou": row["miou"] + jitter})
    write_csv(out / "summary.csv", summary, SUMMARY_KEYS, names)

    spec = load_spec("configs/experiments/benchmark_v2.yaml")
    compared = benchmark_table.comparison_results(spec, summary, final=True)
    comparisons.write_comparisons(out / "comparisons.csv", compared)

    deltas = []
    for seed in (1, 2, 3):
        gap = float(rng.uniform(2.8, 3.6))
        for fraction, active, precision, gain in ((0.1, .80, .84, -.01), (0.3, .52, .92, .0),
                                                  (0.6, .21, .96, -.005)):
            for stage in (1, 2, 3):
                deltas.append({"preset": "class", "seed": seed, "fraction": fraction,
                               "smallest_gap": gap,
                               "delta_d": benchmark_table.delta_d_value(fraction, gap),
                               "stage": stage,
                               "active_fraction": min(1.0, active + 0.04 * stage + rng.normal(0, .02)),
                               "active_precision": precision - 0.01 * stage + rng.normal(0, .01),
                               "miou": 0.50 + gain + 0.01 * stage + rng.normal(0, .015)})
    write_csv(out / "delta_d.csv", deltas, benchmark_table.DELTA_D_KEYS)

    labels = []
    cells = 600 * 24 * 48
    for preset in progress:
        for arm in ("cag", "self_training"):
            for seed in seeds[preset]:
                for stage in (1, 2, 3):
                    for rule, cover in (("anchor", 0.25), ("probability", 0.30)):
                        for n in present:
                            gt = int(share[n] * cells)
                            coverage = min(1.0, cover + 0.05 * stage + rng.normal(0, .03))
                            precision = (0.80 if n in small else 0.93) - 0.02 * stage
                            labelled = int(gt * coverage)
                            correct = int(labelled * precision)
                            assigned = correct + int(correct * (1 - precision) / precision)
                            labels.append({"preset": preset, "arm": arm, "seed": seed, "stage": stage,
                                           "rule": rule, "class": n, "ground_truth_pixels": gt,
                                           "assigned_pixels": assigned, "correct_pixels": correct,
                                           "labelled_pixels": labelled,
                                           "precision": correct / assigned, "recall": correct / gt,
                                           "coverage": labelled / gt})
    write_csv(out / "pseudo_labels.csv", labels, PSEUDO_LABEL_KEYS)

    grid = {"class": {0.3: (.53, .58), 0.35: (.425, .495), 0.4: (.308, .396), 0.45: (.214, .303),
                      0.5: (.156, .230)},
            "full": {0.3: (.478, .562), 0.35: (.362, .476), 0.4: (.254, .381), 0.45: (.179, .298),
                     0.5: (.137, .230)},
            "global": {1.0: (.670, .736), 1.6: (.414, .690)}}
    oracle_cells = {("class", 0.4): 0.70, ("full", 0.35): 0.71}
    calibration, class_rows = [], []
    for seed in (1, 2, 3):
        for preset, cells_ in grid.items():
            for strength, (so, ad) in cells_.items():
                common = {"preset": preset, "strength": strength, "seed": seed, "split": "val"}
                values = {}
                for arm, mean in (("source_only", so), ("adabn", ad),
                                  ("target_oracle", oracle_cells.get((preset, strength)))):
                    if mean is None:
                        values[arm] = None
                        continue
                    target = mean + rng.normal(0, 0.02)
                    offsets = {n: rng.normal(0, 0.12) - (0.2 if n in small else 0.0) for n in present}
                    centre = float(np.mean(list(offsets.values())))
                    ious = {n: float(np.clip(target + v - centre, 0.0 if arm != "target_oracle"
                                             else 0.3, 1)) for n, v in offsets.items()}
                    values[arm] = float(np.mean(list(ious.values())))
                    class_rows.append({**common, "arm": arm, **ious})
                ratio, closure = ratio_and_closure(values["source_only"], values["adabn"],
                                                   values["target_oracle"])
                calibration.append({**common, "source_iters": 4000, **values, "ratio": ratio,
                                    "closure": closure})
                calibration.append({**common, "source_iters": 8000,
                                    "source_only": values["source_only"] + rng.normal(0.003, 0.004)})
    write_csv(out / "calibration.csv", calibration, CALIBRATION_KEYS)
    write_csv(out / "calibration_classes.csv", class_rows, CALIBRATION_CLASS_KEYS,
              names)
    record = {"complete": True, "wall_seconds": 54321.0, "jobs": 3, "commit": "f" * 40,
              "runs": [{"run": "placeholder"}] * 3}
    write_runs(out / "calibration_runs.json", record)
    write_runs(out / "runs.json", {**record, "eval_split": "test"})
    print(f"placeholder results in {out}: {len(summary)} summary rows, {len(compared)} comparisons")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fake", metavar="DIR", help="write placeholder results files into DIR")
    parser.add_argument("--execute", metavar="DIR", help="write the draft, then run it on DIR")
    parser.add_argument("--book", nargs="?", const="results", metavar="DIR",
                        help="write book/08_results.ipynb (no banner) and run it on DIR "
                             "(default: results)")
    args = parser.parse_args(argv)
    if args.fake:
        fake(Path(args.fake).resolve())
    if args.execute:
        print(f"executed {execute(str(Path(args.execute).resolve()))}")
    if args.book:
        folder = Path(args.book).resolve()
        shown = folder.relative_to(REPO) if folder.is_relative_to(REPO) else folder
        print(f"executed {execute(str(shown), BOOK, banner=False)}")
    if not (args.fake or args.execute or args.book):
        print(f"wrote {write()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
