"""Estimate a full-depth timing from runs at reduced LLM depth: time = a + b * layers.

A decode step (or a time to first token) of a decoder-only LLM is a fixed part that does not grow
with depth (embedding gather, final norm, lm_head over the 32000-row vocabulary, Python and I/O per
step, and for a first token the vision tower and projector) plus one identical cost per transformer
layer (same widths, same weights bytes, same KV bytes per layer). Scaling a shallow measurement by
32 / layers would multiply the fixed part too; fitting a and b from two or more depths does not.
The fit is ordinary least squares in seconds (exact through two points); the estimate is a
prediction outside the measured depths, so it carries each measurement's noise times the lever
(target - mean depth) / spread of the depths, and is reported as an estimate, never as a measurement.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class LinearFit:
    a: float            # seconds that do not depend on depth
    b: float            # seconds per LLM layer
    layers: tuple       # the depths measured

    def at(self, layers: float) -> float:
        return self.a + self.b * layers


def fit_depth(points: list) -> LinearFit:
    """Least-squares line through [(layers, seconds), ...]; needs at least two distinct depths."""
    xs = [float(x) for x, _ in points]
    ys = [float(y) for _, y in points]
    if len(set(xs)) < 2:
        raise ValueError(f"a depth fit needs two distinct depths, got {sorted(set(xs))}")
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return LinearFit(a=my - b * mx, b=b, layers=tuple(sorted(set(int(x) for x in xs))))


def lever(layers: tuple, target: float) -> float:
    """How much one depth's timing error moves the estimate at `target` for a two-depth fit: an
    error e in the deeper depth's time moves it by e * lever (the shallower one by e * (lever - 1))."""
    lo, hi = min(layers), max(layers)
    return (target - lo) / (hi - lo)


def estimate_rows(measured: dict, target: int) -> dict:
    """measured: {system: {key: {layers: seconds}}} -> {system: {key: {"a_s", "b_s", "est_s", "est_tok_s"}}}:
    the fit per system and measure and its time and tokens/s at `target` layers. A fit that predicts no
    time at all (noise made b negative) keeps est_s None and says why in "error": reported, not hidden."""
    out = {}
    for system, by_key in measured.items():
        out[system] = {}
        for key, by_depth in by_key.items():
            f = fit_depth(sorted(by_depth.items()))
            est = f.at(target)
            row = {"a_s": f.a, "b_s": f.b, "est_s": est, "est_tok_s": 1 / est if est > 0 else None}
            if est <= 0:
                row.update(est_s=None, error=f"the fit predicts {est:.4f} s at {target} layers: measurements "
                                             f"{by_depth} too noisy to extrapolate")
            out[system][key] = row
    return out
