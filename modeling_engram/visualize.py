"""Plots: where the memory fires (per-token Engram gate values, paper Figure 7 style, as PNG and HTML) and loss
curves."""

import html
from pathlib import Path

import torch

from .engram_layer import EngramGate

_CHARS_PER_LINE = 96


@torch.no_grad()
def gate_values(model, input_ids: torch.LongTensor) -> dict[int, torch.Tensor]:
    """Gate alpha of every Engram layer for one sequence: `{layer_id: [T, hc_mult]}` (float32, on the CPU)."""
    base = model.base_model
    captured, handles = {}, []
    for layer_id in base.config.engram_layer_ids:
        gate = next(m for m in base.layers[layer_id].engram.modules() if isinstance(m, EngramGate))

        def hook(module, args, output, layer_id=layer_id):
            captured[layer_id] = output[0, :, :, 0].float().cpu()

        handles.append(gate.register_forward_hook(hook))
    try:
        model(input_ids[:1])
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token's own text (decoded alone, so byte-level pieces read naturally); newlines shown as ⏎."""
    return [tokenizer.decode([i]).replace("\n", "⏎") or "∅" for i in ids]


def _html(tokens: list[str], gates: dict[int, torch.Tensor], title: str) -> str:
    sections = []
    for layer_id, values in gates.items():
        for branch in range(values.shape[1]):
            spans = "".join(
                f'<span title="gate {v:.3f}" style="background: rgba(220, 60, 40, {v:.3f})">{html.escape(t)}</span>'
                for t, v in zip(tokens, values[:, branch].tolist())
            )
            sections.append(f"<h3>layer {layer_id}, branch {branch}</h3>\n<p class=tokens>{spans}</p>")
    style = "body{font-family:sans-serif} .tokens{font-family:monospace;white-space:pre-wrap;line-height:1.8}"
    return (f"<!doctype html>\n<html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h2>{html.escape(title)}</h2>\n" + "\n".join(sections)
            + "\n</body></html>\n")


def _png(tokens: list[str], gates: dict[int, torch.Tensor], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    panels = [(layer_id, b, values[:, b].tolist()) for layer_id, values in gates.items() for b in range(values.shape[1])]
    layouts = []
    for *_, values in panels:  # flow tokens into lines of at most _CHARS_PER_LINE monospace characters
        x, line, cells = 0, 0, []
        for token in tokens:
            width = max(1, len(token))
            if x + width > _CHARS_PER_LINE and x > 0:
                x, line = 0, line + 1
            cells.append((x, line, width))
            x += width
        layouts.append((cells, line + 1))
    rows = sum(lines + 1.5 for _, lines in layouts)
    figure = plt.figure(figsize=(13, 0.28 * rows + 0.6))
    axis = figure.add_axes([0.01, 0.01, 0.98, 0.98 - 0.4 / figure.get_figheight()])
    axis.set_xlim(0, _CHARS_PER_LINE)
    axis.set_ylim(rows, 0)
    axis.axis("off")
    colormap = plt.get_cmap("Reds")
    top = 0.0
    for (layer_id, branch, values), (cells, lines) in zip(panels, layouts):
        axis.text(0, top + 0.9, f"layer {layer_id}, branch {branch}", fontsize=9, weight="bold")
        top += 1.5
        for token, value, (x, line, width) in zip(tokens, values, cells):
            axis.add_patch(Rectangle((x, top + line), width, 0.95, color=colormap(value)))
            axis.text(x + 0.05, top + line + 0.72, token, fontsize=7, family="monospace",
                      color="white" if value > 0.6 else "black")
        top += lines
    figure.suptitle(title, fontsize=10)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def gate_heatmap(model, tokenizer, text: str, path: str | Path, max_tokens: int = 160,
                 title: str | None = None) -> dict[int, torch.Tensor]:
    """Render where Engram's gates open on `text`, per Engram layer and residual branch.

    Writes `path` with suffixes `.png` and `.html` (colour = gate alpha in [0, 1]; the HTML shows each value on
    hover) and returns `{layer_id: alpha [T, hc_mult]}`. Uses the first `max_tokens` tokens of `text`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens]
    was_training = model.training
    model.eval()
    try:
        gates = gate_values(model, ids.to(model.device))
    finally:
        model.train(was_training)
    tokens = _token_texts(tokenizer, ids[0].tolist())
    title = title or f"Engram gates ({len(tokens)} tokens)"
    path.with_suffix(".html").write_text(_html(tokens, gates, title), encoding="utf-8")
    _png(tokens, gates, title, path.with_suffix(".png"))
    return gates


def plot_loss_curves(
    train_losses: dict[str, list[float]],
    path: str | Path,
    title: str,
    smooth: int = 25,
    validation: dict[str, list[tuple[int, float]]] | None = None,
) -> None:
    """One PNG of several runs' training losses (`smooth`-step running means) and, if given, validation points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for index, (name, losses) in enumerate(train_losses.items()):
        color = f"C{index}"
        losses = torch.tensor(losses)
        kernel = min(smooth, len(losses))
        smoothed = torch.nn.functional.avg_pool1d(losses[None, None], kernel, stride=1)[0, 0]
        axis.plot(range(kernel, len(losses) + 1), smoothed, color=color, alpha=0.45 if validation else 1.0,
                  label=f"{name} train ({kernel}-step mean)")
        if validation and validation.get(name):
            steps, values = zip(*validation[name])
            axis.plot(steps, values, "o-", color=color, label=f"{name} validation")
    axis.set_xlabel("step")
    axis.set_ylabel("loss (nats/token)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


__all__ = ["gate_heatmap", "gate_values", "plot_loss_curves"]
