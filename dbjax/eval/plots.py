"""Pictures a person would rather look at than read: sample grids, loss curves, and a
classifier's confusion matrix and accuracy against inference steps."""
import matplotlib.image
import numpy as np
# Figures made without pyplot render to files on any machine (CI, servers) and leave
# pyplot's backend alone, so a notebook that imports dbjax still shows its own plots.
from matplotlib.figure import Figure


def _figure(figsize):
  fig = Figure(figsize=figsize)
  return fig, fig.subplots()


def image_grid(images: np.ndarray, rows: int) -> np.ndarray:
  """(N, H, W, C) in [-1, 1] -> one (rows*H, cols*W, C) uint8 image, 1-pixel gaps."""
  n, h, w, c = images.shape
  cols = -(-n // rows)
  grid = np.ones((rows * (h + 1) - 1, cols * (w + 1) - 1, c), np.float32)
  for i, image in enumerate(images):
    r, k = divmod(i, cols)
    grid[r * (h + 1):r * (h + 1) + h, k * (w + 1):k * (w + 1) + w] = (image + 1) / 2
  return (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)


def save_image_grid(images: np.ndarray, path: str, rows: int, scale: int = 4,
                    row_labels: list[str] | None = None):
  """Save images as a PNG grid, each pixel enlarged `scale` times (8x8 digits are tiny);
  with row_labels, each row named on its left."""
  grid = image_grid(images, rows).repeat(scale, 0).repeat(scale, 1)
  grid = grid[..., 0] if grid.shape[-1] == 1 else grid
  if not row_labels:
    matplotlib.image.imsave(path, grid, cmap="gray", vmin=0, vmax=255)
    return
  height, width = grid.shape[:2]
  fig, ax = _figure((1.5 + width / 100, 0.3 + height / 100))
  ax.imshow(grid, cmap="gray", vmin=0, vmax=255)
  row_height = height / rows
  ax.set_yticks((np.arange(rows) + 0.5) * row_height, row_labels)
  ax.set_xticks([])
  fig.tight_layout()
  fig.savefig(path, dpi=100)


LOSS_LABELS = {"loss": "weighted denoising loss", "cross_entropy": "cross-entropy"}


def save_loss_curves(rows: list[dict], num_blocks: int, path: str, title: str = "",
                     metric: str = "loss"):
  """One line per block: a training metric (moving average) against the iteration."""
  fig, ax = _figure((7, 4))
  for b in range(num_blocks):
    steps = np.array([r["step"] for r in rows if r["block"] == b])
    losses = np.array([r[metric] for r in rows if r["block"] == b])
    if len(losses) == 0:
      continue
    window = max(1, len(losses) // 50)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    ax.plot(steps[window - 1:], smooth, label=f"block {b}" if num_blocks > 1 else "end-to-end")
  ax.set(xlabel="iteration", ylabel=LOSS_LABELS.get(metric, metric), yscale="log",
         title=title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def save_confusion_matrix(counts: np.ndarray, path: str, title: str = "",
                          class_names: tuple = ()):
  """Row-normalised confusion matrix (true class down, predicted across), counts inside;
  classes named where class_names gives them."""
  rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
  num_classes = len(counts)
  fig, ax = _figure((1.0 + 0.45 * num_classes, 0.8 + 0.45 * num_classes))
  ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
  if num_classes <= 20:
    for (i, j), count in np.ndenumerate(counts):
      ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
              color="white" if rates[i, j] > 0.5 else "black")
  ax.set(xlabel="predicted class", ylabel="true class", title=title)
  if class_names and num_classes <= 40:
    ax.set_xticks(range(num_classes), class_names, rotation=90)
    ax.set_yticks(range(num_classes), class_names)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def save_metric_vs_steps(values: dict, path: str, xlabel: str, ylabel: str, title: str = "",
                         mark: int | None = None, mark_label: str = ""):
  """A metric against a number of inference steps or iterations (log-scaled x), with an
  optional vertical line at `mark`."""
  save_metric_lines({"": values}, path, xlabel, ylabel, title, mark, mark_label)


def save_metric_lines(lines: dict, path: str, xlabel: str, ylabel: str, title: str = "",
                      mark: int | None = None, mark_label: str = ""):
  """Lines {label: {steps: metric}} against a number of steps (log-scaled x), labelled
  lines in a legend, with an optional vertical line at `mark`."""
  fig, ax = _figure((5, 3.5))
  for label, values in lines.items():
    steps = sorted(values)
    ax.plot(steps, [values[n] for n in steps], "o-", label=label or None)
  if mark is not None:
    ax.axvline(mark, color="gray", linestyle=":", label=mark_label)
  if mark is not None or any(lines):
    ax.legend(fontsize=7)
  steps = sorted({n for values in lines.values() for n in values})
  ax.set(xlabel=xlabel, ylabel=ylabel, xscale="log", title=title)
  ax.minorticks_off()  # a log axis within one decade would label 3 x 10^0 and the like
  ax.set_xticks(steps, [str(n) for n in steps])
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def save_accuracy_vs_steps(accuracy: dict, num_blocks: int, path: str):
  """Test accuracy against the number of denoising calls at inference, N = B marked."""
  save_metric_vs_steps(accuracy, path, "inference steps N", "test accuracy",
                       mark=num_blocks, mark_label=f"N = B = {num_blocks}")
