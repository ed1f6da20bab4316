"""Mirror of ldm's ``ldm.modules.diffusionmodules.util.checkpoint`` (the helper of
Stability-AI/stablediffusion that A1111 1.8.0 and 1.10.1 run SD1.x models with).

What it does to an extension: with the flag set (``BasicTransformerBlock.checkpoint`` and
``ResBlock.use_checkpoint``, both True from the stock ``configs/v1-inference.yaml``'s
``use_checkpoint: True``), the block's forward runs as a custom autograd function whose forward
is evaluated under ``torch.no_grad()``. The block's OUTPUT still gets a backward (which runs the
block again with gradients and differentiates with respect to its inputs AND its parameters),
but anything a hook captures inside the block has no graph. Written from that behaviour, not
copied.
"""

import torch


def checkpoint(func, inputs, params, flag):
    """``func(*inputs)``; with ``flag``, through :class:`CheckpointFunction` (no graph inside)."""
    if not flag:
        return func(*inputs)
    return CheckpointFunction.apply(func, len(inputs), *inputs, *params)


class CheckpointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run_function, length, *args):
        ctx.run_function = run_function
        ctx.inputs = args[:length]
        ctx.params = args[length:]
        with torch.no_grad():  # as ldm: the block's insides are computed without a graph
            return run_function(*ctx.inputs)

    @staticmethod
    def backward(ctx, *output_grads):
        inputs = [x.detach().requires_grad_(True) if torch.is_tensor(x) else x for x in ctx.inputs]
        with torch.enable_grad():
            outputs = ctx.run_function(*[x.view_as(x) if torch.is_tensor(x) else x for x in inputs])
        tensors = [x for x in inputs if torch.is_tensor(x)]
        # as ldm: the parameters are differentiated too, so frozen ones (requires_grad=False)
        # make this fail with "One of the differentiated Tensors does not require grad"
        grads = list(
            torch.autograd.grad(outputs, tensors + list(ctx.params), output_grads, allow_unused=True)
        )
        input_grads = [grads.pop(0) if torch.is_tensor(x) else None for x in inputs]
        return (None, None, *input_grads, *grads)
