"""Progress bars of a tuning job: one per document and, with several documents, one overall.

    display = JobProgressDisplay(enabled=True)
    job.run(on_step=lambda report: display.update(job.progress()))
    display.close()

`update` takes `BatchTuneJob.progress()` ({name: {status, step, steps, last_loss, …}}):
a document's bar appears when it is admitted (its step count is known), advances with its
steps and closes when it is done or failed; the overall bar counts the steps of every
document admitted so far.
"""
from __future__ import annotations

from tqdm.auto import tqdm


class JobProgressDisplay:
    """tqdm bars over a job's progress snapshots (nothing is shown when disabled)."""

    def __init__(self, enabled: bool = True, overall: bool | None = None):
        """overall: show the overall bar (None: only once a second document appears)."""
        self.enabled = enabled
        self.overall_wanted = overall
        self.bars: dict[str, tqdm] = {}
        self.overall: tqdm | None = None
        self._slots = 0

    def _bar(self, name: str, total: int, initial: int) -> tqdm:
        bar = tqdm(total=total, initial=initial, desc=name, unit="step", position=self._slots,
                   leave=True, dynamic_ncols=True)
        self._slots += 1
        return bar

    def update(self, progress: dict[str, dict]) -> None:
        if not self.enabled:
            return
        show_overall = self.overall_wanted if self.overall_wanted is not None else len(progress) > 1
        if show_overall and self.overall is None:
            self.overall = self._bar("all documents", 0, 0)
        done_steps = total_steps = 0
        for name, info in progress.items():
            steps, step = int(info.get("steps") or 0), int(info.get("step") or 0)
            total_steps += steps
            done_steps += min(step, steps)
            if steps == 0:
                continue
            bar = self.bars.get(name)
            if bar is None:
                bar = self.bars[name] = self._bar(name, steps, step)
            if bar.disable:
                continue
            bar.n = min(step, steps)
            if info.get("last_loss") is not None:
                bar.set_postfix(loss=f"{info['last_loss']:.3f}", refresh=False)
            bar.refresh()
            if info.get("status") in ("done", "failed"):
                bar.close()
        if self.overall is not None:
            self.overall.total = total_steps
            self.overall.n = done_steps
            finished = sum(1 for info in progress.values() if info.get("status") in ("done", "failed"))
            self.overall.set_postfix(documents=f"{finished}/{len(progress)}", refresh=False)
            self.overall.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        if self.overall is not None:
            self.overall.close()
