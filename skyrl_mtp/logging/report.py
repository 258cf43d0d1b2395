"""End-of-run artefacts from metrics.jsonl: a PNG plot and a short Markdown summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from skyrl_mtp.logging.trackers import read_jsonl


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(jsonl: str | Path, out_png: str | Path) -> Path:
    """Reward, response length, PPO clipping, and draft acceptance (overall and per position) vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_jsonl(jsonl)]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    x, y = _series(rows, "reward/mean")
    axes[0].plot(x, y, marker="o", label="train reward")
    x, y = _series(rows, "eval/reward_mean")
    if x:
        axes[0].plot(x, y, marker="s", label="eval reward")
    axes[0].set_title("reward")
    axes[0].legend()
    x, y = _series(rows, "response/length_mean")
    axes[1].plot(x, y, marker="o")
    axes[1].set_title("response length (tokens)")
    for key, label in (("policy/clip_frac", "clipped tokens"), ("policy/approx_kl", "approx KL to old")):
        x, y = _series(rows, key)
        if x:
            axes[2].plot(x, y, marker=".", label=label)
    axes[2].set_title("PPO mini-batch updates")
    if axes[2].lines:
        axes[2].legend()
    x, y = _series(rows, "vllm/draft_acceptance_rate")
    axes[3].plot(x, y, marker="o", linewidth=2, label="overall")
    pos_keys = sorted({k for r in rows for k in r if k.startswith("vllm/draft_acceptance_rate_pos_")},
                      key=lambda k: int(k.rsplit("_", 1)[-1]))
    for key in pos_keys:
        x, y = _series(rows, key)
        axes[3].plot(x, y, linestyle="--", label=f"position {key.rsplit('_', 1)[-1]}")
    axes[3].set_ylim(0, 1)
    axes[3].set_title("vllm/draft_acceptance_rate")
    if x:
        axes[3].legend()
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def summarize_run(jsonl: str | Path, out_md: str | Path, title: str = "Run summary") -> str:
    rows = read_jsonl(jsonl)
    if not rows:
        raise ValueError(f"{jsonl} has no metrics rows")
    first, last = rows[0], rows[-1]
    keys = ["reward/mean", "vllm/draft_acceptance_rate", "vllm/draft_mean_acceptance_length", "mtp/loss",
            "response/length_mean", "eval/reward_mean"]
    lines = [f"# {title}", "", f"Steps {first['step']} to {last['step']} ({len(rows)} logged).", "",
             "| metric | first | last |", "|---|---|---|"]
    for key in keys:
        xs, ys = _series(rows, key)
        if ys:
            lines.append(f"| `{key}` | {ys[0]:.3f} | {ys[-1]:.3f} |")
    text = "\n".join(lines) + "\n"
    Path(out_md).write_text(text)
    return text
