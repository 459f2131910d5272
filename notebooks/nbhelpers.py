"""
What the notebooks share, so that each cell reads as the step it performs: the figure style, and
(below) the training loops of notebook 05.

    from nbhelpers import figure
    fig, ax = figure()                  # one readable panel: 900 px wide, 11 pt labels
    fig, (a, b) = figure(ncols=2)
"""
import contextlib
import math

import matplotlib.pyplot as plt
import torch

STYLE = {"figure.dpi": 100, "savefig.dpi": 100, "font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11,
         "xtick.labelsize": 10, "ytick.labelsize": 10, "legend.fontsize": 10, "axes.grid": True,
         "grid.alpha": 0.3}


def figure(ncols: int = 1, nrows: int = 1, width: float = 9.0, height: float = 3.6, **kwargs):
    """plt.subplots in the notebooks' style: `width` inches at 100 dpi (900 px by default, at least
    600 px), labels of at least 10 pt, a light grid. Returns (fig, ax) or (fig, axes)."""
    plt.rcParams.update(STYLE)
    return plt.subplots(nrows, ncols, figsize=(width, height * nrows), layout="constrained", **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Notebook 05 (RADLADS in miniature): the training loop and the hooks the stages use. The notebook's cells
# say what each stage trains and on which loss; the mechanics shared by the stages live here.


def cosine(opt, steps: int, lr_min: float):
    """A LambdaLR that anneals opt's learning rate from its initial value to lr_min over `steps` (cosine)."""
    lr_max = opt.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (lr_min + (lr_max - lr_min) * 0.5 * (1 + math.cos(math.pi * s / steps))) / lr_max)


def train(params, batch_loss, steps: int, lr: float, lr_min: float, after_backward=None):
    """AdamW (no weight decay) on `params`, lr cosine lr -> lr_min, `steps` steps. Each step calls
    batch_loss(step) -> (loss, record) on a fresh batch, backpropagates the loss, calls
    after_backward(step) if given (the gradients are there), and steps. Returns [record per step]."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = cosine(opt, steps, lr_min)
    history = []
    for step in range(steps):
        loss, record = batch_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward(step)
        opt.step()
        sched.step()
        history.append(record)
    return history


def teacher_taps(teacher, ids):
    """Run an HF Llama teacher on ids without gradients. Returns its logits and, per layer i,
    {i: the attention's input (input_layernorm's output)} and {i: the attention's output}."""
    attn_in, attn_out, handles = {}, {}, []
    for i, layer in enumerate(teacher.model.layers):
        handles.append(layer.input_layernorm.register_forward_hook(lambda mod, args, out, i=i: attn_in.__setitem__(i, out)))
        # LlamaAttention returns a tuple; the output is its first element
        handles.append(layer.self_attn.register_forward_hook(lambda mod, args, out, i=i: attn_out.__setitem__(i, out[0])))
    try:
        with torch.no_grad():
            logits = teacher(ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, attn_in, attn_out


@contextlib.contextmanager
def fed_from_teacher(model, layers, feed):
    """While active, model.model.layers[i].self_attn (i in layers) reads feed[i] in place of its own input.
    Yields {i: that mixer's output}, filled by each forward."""
    out, handles = {}, []
    for i in layers:
        mix = model.model.layers[i].self_attn
        handles.append(mix.register_forward_pre_hook(lambda mod, args, i=i: (feed[i], *args[1:])))
        handles.append(mix.register_forward_hook(lambda mod, args, res, i=i: out.__setitem__(i, res[0])))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
