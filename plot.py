"""
Your runs as pictures: the loss curves of one run or several, from the metrics.jsonl that train.py writes
in each out_dir.

    python plot.py out-shakespeare-char-cpu                  # -> out-shakespeare-char-cpu/curves.png
    python plot.py out-a out-b                               # two runs on shared axes -> runs.png

One PNG: the loss against iterations, tokens seen and wall time, train and val for each run (named in the
legend by its out_dir), and the learning rate below. matplotlib is imported here only, when drawing.

metrics.jsonl holds one JSON object per line: a log line's {iter, loss, lr, ms, tok_s, mfu, tokens, time}, or
an eval's {iter, train_loss, val_loss, lr, tokens, time, and the tasks' figures}. time is wall seconds since
the run started, tokens the tokens trained on; both go on across resumes.
"""

import importlib.util
import json
import os
import shlex
import sys
import time

from dataset import die


def read_metrics(out_dir):
    """The records of out_dir/metrics.jsonl, in order ([] without one). A line cut short by a crash is skipped."""
    records = []
    try:
        with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    pass
    except OSError:  # no such run (or not a directory)
        pass
    return records


class MetricsLog:
    """out_dir/metrics.jsonl, written a line at a time and flushed, so it is whole at any moment, and the curves
    drawn from it. A resumed run continues it: the records past the iteration it resumes from (steps a preemption
    made it repeat) go first. Neither a full disk nor a broken matplotlib stops a run: they stop the log, with a
    warning. seconds and tokens: where the run had got to, for a resume (its checkpoint has them)."""

    def __init__(self, out_dir, resume_iter=None, seconds=None, tokens=None, plot=True):
        self.out_dir, self.path = out_dir, os.path.join(out_dir, 'metrics.jsonl')
        records = read_metrics(out_dir)
        kept = [r for r in records if r.get('iter', 0) <= resume_iter] if resume_iter is not None else []
        if len(kept) < len(records):
            print(f"{len(records) - len(kept)} records of {self.path} past iteration {resume_iter or 0} dropped: "
                  "this run writes them anew")
        last = kept[-1] if kept else {}
        self.seconds = seconds if seconds is not None else last.get('time', 0.0)
        self.tokens = tokens if tokens is not None else last.get('tokens', 0)
        self.start, self.plot = time.time(), plot and importlib.util.find_spec('matplotlib') is not None
        try:
            with open(self.path + '.tmp', 'w') as f:
                f.writelines(json.dumps(record) + '\n' for record in kept)
            os.replace(self.path + '.tmp', self.path)
            self.file = open(self.path, 'a')
        except OSError as e:
            self.file = self.warn(f"cannot write {self.path} ({e.strerror or e})")

    def elapsed(self):
        """Wall seconds since the run began, resumes included."""
        return self.seconds + time.time() - self.start

    def write(self, **record):
        if self.file:
            try:
                self.file.write(json.dumps({**record, 'time': self.elapsed()}) + '\n')
                self.file.flush()
            except OSError as e:  # a full disk: the log stops, training goes on
                self.file = self.warn(f"cannot write {self.path} ({e.strerror or e})")

    def draw(self):
        """out_dir/curves.png, redrawn from the log."""
        if self.plot:
            try:
                plot_runs([self.out_dir], os.path.join(self.out_dir, 'curves.png'))
            except Exception as e:  # a broken matplotlib, say: no more curves, the run goes on
                self.plot = self.warn(f"cannot draw {self.out_dir}/curves.png ({type(e).__name__}: {e})")

    @staticmethod
    def warn(message):
        print(f"warning: {message}; training goes on without it", flush=True)
        return None


def duration(seconds):
    """42s, 3m07s, 2h05m."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def summary(out_dir, iter_num, max_iters, train_loss, tokens, seconds, total_seconds, stopped_by, chat):
    """The block that ends a run: how far it got, its best val loss, where its files are, what to run next."""
    best = min((r for r in read_metrics(out_dir) if 'val_loss' in r), key=lambda r: r['val_loss'], default=None)
    files = [os.path.join(out_dir, name) for name in ('ckpt.pt', 'best.pt', 'curves.png', 'metrics.jsonl')]
    lines = [f"\n--- iteration {iter_num} of {max_iters}, stopped by {stopped_by}, after {duration(seconds)} "
             f"({duration(total_seconds)} in all); {tokens:,} tokens trained on",
             (f"best val loss {best['val_loss']:.4f} at iteration {best['iter']}" if best else "no eval yet")
             + (f", last train loss {train_loss:.4f}" if train_loss is not None else ""),
             f"files: {', '.join(f for f in files if os.path.exists(f)) or 'none yet'}"]
    if os.path.exists(files[0]):
        out_dir = shlex.quote(out_dir)
        lines += ["next:", f"  python sample.py --out_dir={out_dir}{' --chat' if chat else ''}",
                  f"  python eval.py --out_dir={out_dir}", f"  python plot.py {out_dir}"]
    print('\n'.join(lines), flush=True)


def plot_runs(out_dirs, output, names=None):
    """Draw the runs' curves into the image file output (PNG, or what its extension says) -> the matplotlib Figure."""
    from matplotlib.figure import Figure  # the object API: no pyplot, no GUI backend, no global state

    fig = Figure(figsize=(12, 5.5), layout='constrained')
    grid = fig.add_gridspec(2, 3, height_ratios=[3, 1])
    axes = [fig.add_subplot(grid[0, i]) for i in range(3)]
    lr_axis = fig.add_subplot(grid[1, 0], sharex=axes[0])
    for k, (out_dir, name) in enumerate(zip(out_dirs, names or out_dirs)):
        records = read_metrics(out_dir)
        logs = [r for r in records if 'loss' in r]
        evals = [r for r in records if 'val_loss' in r]
        for axis, x in zip(axes, ('iter', 'tokens', 'time')):
            axis.plot([r[x] for r in logs], [r['loss'] for r in logs], color=f'C{k}', alpha=0.45, linewidth=1,
                      label=f'{name} train')
            axis.plot([r[x] for r in evals], [r['val_loss'] for r in evals], color=f'C{k}', marker='o',
                      markersize=3, linewidth=1.5, label=f'{name} val')
        lr_axis.plot([r['iter'] for r in logs], [r['lr'] for r in logs], color=f'C{k}', linewidth=1)
    for axis, label in zip(axes, ('iteration', 'tokens seen', 'wall time (s)')):
        axis.set_xlabel(label)
        axis.set_ylabel('loss')
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    lr_axis.set_ylabel('learning rate')
    lr_axis.set_xlabel('iteration')
    lr_axis.grid(alpha=0.3)
    directory, name = os.path.split(output)
    tmp = os.path.join(directory, '.tmp-' + name)  # then renamed: a reader never sees half a file
    fig.savefig(tmp, dpi=80)
    os.replace(tmp, output)
    return fig


def main(argv):
    out_dirs = [a for a in argv if not a.startswith('--')]
    options = dict(a[2:].partition('=')[::2] for a in argv if a.startswith('--'))
    if not out_dirs or set(options) - {'output'}:
        die("usage: python plot.py OUT_DIR [OUT_DIR ...] [--output=curves.png]")
    for out_dir in out_dirs:
        if not read_metrics(out_dir):
            die(f"{out_dir} has no metrics.jsonl (train.py writes one in its out_dir): name a run's out_dir")
    if 'output' in options and not options['output']:
        die("--output needs a file name: --output=runs.png")
    output = options.get('output') or (os.path.join(out_dirs[0], 'curves.png') if len(out_dirs) == 1 else 'runs.png')
    try:
        plot_runs(out_dirs, output)
    except ImportError:
        die("plot.py draws with matplotlib: pip install matplotlib")
    except OSError as e:
        die(f"cannot write {output} ({e.strerror or e}): pass another --output")
    print(f"wrote {output}")


if __name__ == '__main__':
    main(sys.argv[1:])
