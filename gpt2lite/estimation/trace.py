"""One optimizer step of a run traced on fake tensors: every tensor storage's bytes, when it is made and freed.

    trace = trace_step(build_model, StepShape(batch_size=8, seq_len=512), TrainConfig(...))
    trace.peak_bytes, trace.parts()        # the step's peak of live tensor bytes and what is live then

The model is built inside torch's FakeTensorMode: tensors have shapes, dtypes and devices but no data, so
nothing is allocated and no weight is read. `LiveBytes`, a TorchDispatchMode above it, sees each operation's
outputs, counts each new storage once (views and in-place results share their input's) and takes its bytes
off when Python frees it (a weak reference on the storage). The maximum of that sum over the step is the
peak the allocator would have to serve, with no fragmentation: CUDA's max_memory_allocated, or on the CPU
the tensors' share of the resident set.

The few operations whose output shape depends on tensor values are answered as for a batch of real tokens
with a label at every position and no padding: a boolean mask selects everything, `.item()` reads 0 (ids
and labels in range), True (no padding) or 1.0 (the loss's gradient, with one micro-batch per step).
4-bit quantization is shape-only here (its arithmetic would cost seconds per layer on fake tensors and
leaves tensors of known sizes); the real run quantizes while loading, one layer at a time.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch

from gpt2lite.training.optim import parameter_groups
from gpt2lite.training.precision import autocast
from gpt2lite.estimation.parts import StepTrace, Storage, model_tensors, summarize

# torch keeps both under underscored modules; proxy_tensor is the path without an underscore that reaches them
from torch.fx.experimental.proxy_tensor import FakeTensorMode, TorchDispatchMode  # noqa: E402

aten = torch.ops.aten
PHASES = ("weights", "forward", "loss", "backward", "optimizer")
CUDA_BLOCK = 512  # CUDA's caching allocator rounds every allocation up to a multiple of 512 bytes


@dataclass(frozen=True)
class StepShape:
    """The shape of one optimizer step: micro-batches of (batch_size, seq_len) tokens, grad_accum of them."""

    batch_size: int
    seq_len: int
    grad_accum: int = 1


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every live tensor storage; `peak` is their maximum sum so far."""

    def __init__(self, loss_gradient: float = 1.0, block: int = 1, fake: bool = True):
        """loss_gradient: what the loss's gradient reads as a number; block: the allocator's rounding;
        fake: answer the value-dependent operations (False: count the bytes of a run on real tensors)."""
        super().__init__()
        self.fake = fake
        self.storages: List[Storage] = []  # every storage made, in order
        self.live_storages: Dict[int, Storage] = {}  # by StorageImpl address, while alive
        self.live = self.peak = self.clock = self.peak_clock = 0
        self.phase = "weights"
        self.loss_gradient = loss_gradient
        self.block = block

    def track(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        key = storage._cdata  # the StorageImpl's address: the same for every view of it while it lives
        if key in self.live_storages:
            return
        record = Storage(-(-storage.nbytes() // self.block) * self.block, self.clock, self.phase, key)
        self.storages.append(record)
        self.live_storages[key] = record
        self.live += record.nbytes
        if self.live > self.peak:
            self.peak, self.peak_clock = self.live, self.clock
        weakref.finalize(storage, self.free, record)

    def free(self, record: Storage):
        self.clock += 1  # a tick of its own: what is made after an operation was made before this free
        record.freed = self.clock
        self.live -= record.nbytes
        del self.live_storages[record.key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.clock += 1
        answered = self.value_dependent(func, args) if self.fake else None
        if answered is not None:
            return answered
        if self.fake and func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            args = (args[0], every_position(args[1]))
        out = func(*args, **kwargs)
        for tensor in tensors_in(out):
            self.track(tensor)
        return out

    def value_dependent(self, func, args):
        """The answer for an operation whose result depends on values fake tensors do not have."""
        if func is aten._local_scalar_dense.default:
            tensor = args[0]
            return True if tensor.dtype == torch.bool else (self.loss_gradient if tensor.is_floating_point() else 0)
        if func is aten.nonzero.default:
            out = torch.empty((args[0].numel(), args[0].dim()), dtype=torch.long, device=args[0].device)
            self.track(out)
            return out
        return None



def tensors_in(out):
    """The tensors of an operation's output: a tensor, or (nested) tuples and lists of them (foreach ops)."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for item in out:
            yield from tensors_in(item)


def every_position(indices):
    """Boolean masks in an index list replaced by the long indices of a mask that is True everywhere."""
    replaced = []
    for index in indices:
        if index is not None and index.dtype == torch.bool:
            replaced += [torch.empty((index.numel(),), dtype=torch.long, device=index.device)] * index.dim()
        else:
            replaced.append(index)
    return replaced


def fake_batch(model, shape: StepShape, device: torch.device) -> dict:
    B, T = shape.batch_size, shape.seq_len
    ids = torch.zeros(B, T, dtype=torch.long, device=device)
    labels = torch.zeros(B, dtype=torch.long, device=device) if hasattr(model, "score") else ids.clone()
    return {"input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.long, device=device), "labels": labels}


@contextlib.contextmanager
def marked_loss(model: torch.nn.Module, tracker: LiveBytes):
    """Storages made inside the LM loss (its chunked gradients) are counted as loss buffers."""
    slot = getattr(model, "lm_loss", None)
    if slot is None:
        yield
        return

    def loss(*args, **kwargs):
        tracker.phase = "loss"
        try:
            return slot(*args, **kwargs)
        finally:
            tracker.phase = "forward"

    model.lm_loss = loss
    try:
        yield
    finally:
        model.lm_loss = slot


def trace_step(build_model: Callable[[], torch.nn.Module], shape: StepShape, config, device: torch.device,
               precision: str, forward_only: bool = False, fake: bool = True) -> StepTrace:
    """Build the model with build_model() on fake tensors and trace one optimizer step of `shape` as
    train() runs it (AdamW over parameter_groups, the loss weighted by its share of the step's tokens,
    clipping, the update); forward_only: the first micro-batch's forward pass alone.
    config: the run's TrainConfig (activation_checkpointing, weight_decay, lr, betas, clip).
    fake=False: the same step on real tensors (the model allocated, quantized for real): a measurement."""
    micro_batches = min(shape.grad_accum, 2)  # the second one is what every later one repeats
    tracker = LiveBytes(loss_gradient=1.0 if shape.grad_accum == 1 else 0.5,
                        block=CUDA_BLOCK if device.type == "cuda" else 1, fake=fake)
    with (FakeTensorMode() if fake else contextlib.nullcontext()), tracker, \
            (shape_only_quantization() if fake else contextlib.nullcontext()), torch.device(device):
        model = build_model()
        built = tracker.clock
        model.train()
        if config.activation_checkpointing:
            model.set_activation_checkpointing(True)
        floats, quantized = model_tensors(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr, betas=config.betas)
        marks = {"built": built}
        for index in range(micro_batches):
            tracker.phase = "forward"
            with marked_loss(model, tracker), autocast(device, precision):
                loss = model(**fake_batch(model, shape, device))
            marks.setdefault("forward_end", tracker.clock)
            if forward_only:
                break
            tracker.phase = "backward"
            (loss.float() * (1.0 / micro_batches if micro_batches > 1 else 1.0)).backward()
            del loss
        if not forward_only:
            marks["backward_end"] = tracker.clock
            gradients = sum(p.grad.untyped_storage().nbytes() for p in trainable if p.grad is not None)
            tracker.phase = "optimizer"
            torch.nn.utils.clip_grad_norm_(trainable, config.clip or math.inf)
            optimizer.step()
        state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return summarize(tracker, marks, model, floats, quantized, trainable, state,
                         0 if forward_only else gradients)


@contextlib.contextmanager
def shape_only_quantization():
    """4-bit quantization that makes tensors of the sizes quantize_nf4_tensor makes, without its arithmetic."""
    from gpt2lite.quantization import nf4
    from gpt2lite.quantization import linear as qlora  # where NF4Linear calls them

    def quantize(weight, double_quant: bool = True, block_size: int = nf4.NF4_BLOCK_SIZE):
        n_blocks = -(-weight.numel() // block_size)
        packed = torch.empty(n_blocks * block_size // 2, dtype=torch.uint8, device=weight.device)
        if not double_quant:
            return nf4.NF4Tensor(packed, torch.empty(n_blocks, device=weight.device), None, weight.shape)
        n_scales = -(-n_blocks // nf4.ABSMAX_BLOCK_SIZE)
        codes = torch.empty(n_scales * nf4.ABSMAX_BLOCK_SIZE, dtype=torch.uint8, device=weight.device)[:n_blocks]
        absmax = nf4.QuantizedAbsmax(codes, torch.empty(n_scales, device=weight.device),
                                     torch.empty((), device=weight.device))
        return nf4.NF4Tensor(packed, None, absmax, weight.shape)

    replaced = {"quantize_nf4_tensor": quantize, "nf4_codebook": lambda: torch.empty(16),
                "dynamic_map": lambda: torch.empty(256)}  # the lookup tables' sizes
    real = {name: getattr(qlora, name) for name in replaced}
    for name, function in replaced.items():
        setattr(qlora, name, function)
    try:
        yield
    finally:
        for name, function in real.items():
            setattr(qlora, name, function)
