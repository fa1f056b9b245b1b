"""AWQ for HF Llama / Qwen2 decoders, symmetric int4 (mit-han-lab/llm-awq@d6e797a:
awq/quantize/auto_scale.py).

Follows mit-han-lab/llm-awq (awq/quantize/pre_quant.py, auto_scale.py, auto_clip.py) layer by layer:
capture each linear's inputs on calibration data, search per-channel scales for four groups and fold
them into the previous op, search per-group clipping, and finally quantize with vila_edge_export/quantize.py.
The only departure is the quantizer: symmetric (TensorRT takes no zero point, contracts.md) where
llm-awq defaults to uint4 + zero point. Calibration takes input embeddings [1, T, C], so VILA can
calibrate on spliced image + text embeddings.
"""
import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from vila_edge_export.gptq import gptq_quantize, hessian, inverse_hessian, ordered_inverse_hessian
from vila_edge_export.range_search import blocks_of_hessian, search_ranges
from vila_edge_export.quantize import (DEFAULT_GROUP, DEFAULT_LM_HEAD_BITS, QuantConfigError, QuantizedLLM,
                             QuantizedWeight, apply_quantized, decoder_linears, linear_groups, pseudo_quantize,
                             quantize_linears, rtn_quantize)

__all__ = ["awq_quantize", "awq_transform", "text_calibration_embeds", "rtn_quantize", "apply_quantized"]

SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM")
N_GRID = 20            # auto_scale._search_module_scale and auto_clip.auto_clip_layer
MIN_SCALE = 1e-4       # auto_scale: x_max.pow(ratio).clamp(min=1e-4)
MAX_SHRINK = 0.5       # auto_clip: try max_val = absmax * (1 - i/20) for i < 10
N_SAMPLE_TOKENS = 512  # auto_clip: n_sample_token
OC_BATCH = 256         # auto_clip: output channels per batch, bounds the [K/G, tokens, N] buffers
CLIP_SKIP = ("q_proj", "k_proj")  # auto_clip_block: "due to qk bmm, it is hard to clip precisely"


class _StopForward(Exception):
    pass


@dataclass
class _Sample:
    hidden: Tensor  # [1, T, C]: input of the current decoder layer
    kwargs: dict    # what the decoder stack passes every layer: mask, rope (cos, sin), position ids


@dataclass
class _ScaleGroup:
    prev: nn.Module           # RMSNorm or Linear whose output channels get divided by s
    names: list[str]          # linears (names inside the layer) whose input channels get multiplied by s
    feat: str                 # linear whose cached input is x
    inspect: Callable[[Tensor], Tensor]  # x [sum T, K] -> the output compared in the loss


def _capture_first_inputs(model: nn.Module, calib_embeds: list[Tensor]) -> list[_Sample]:
    hidden_size = model.config.hidden_size
    samples = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        samples.append(_Sample(hidden, dict(kwargs)))
        raise _StopForward

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i, e in enumerate(calib_embeds):
            if e.dim() != 3 or e.shape[0] != 1 or e.shape[2] != hidden_size:
                raise QuantConfigError(f"calib_embeds[{i}]: expected [1, T, {hidden_size}], got {list(e.shape)}")
            try:
                model.model(inputs_embeds=e.to(model.dtype), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return samples


def _run_layer(layer: nn.Module, samples: list[_Sample]) -> tuple[dict[str, list[Tensor]], list[Tensor]]:
    """Inputs of every linear (name -> per sample [T, K]) and the layer's outputs."""
    feats: dict[str, list[Tensor]] = {}
    handles = [m.register_forward_hook(lambda m, args, out, name=name: feats.setdefault(name, []).append(
                   args[0].reshape(-1, args[0].shape[-1])))  # [1, T, K] -> [T, K]
               for name, m in layer.named_modules() if isinstance(m, nn.Linear)]
    try:
        outs = [layer(s.hidden, **s.kwargs) for s in samples]
    finally:
        for h in handles:
            h.remove()
    return feats, [o[0] if isinstance(o, tuple) else o for o in outs]


def _scale_groups(layer: nn.Module, samples: list[_Sample]) -> list[_ScaleGroup]:
    attn, mlp = layer.self_attn, layer.mlp

    lengths = [s.hidden.shape[1] for s in samples]

    def run_attn(x):  # attention mixes tokens, so it runs per calibration sequence
        return torch.cat([attn(hidden_states=xi.unsqueeze(0), **s.kwargs)[0].squeeze(0)  # [T, C]
                          for xi, s in zip(torch.split(x, lengths), samples)])

    groups = [_ScaleGroup(layer.input_layernorm, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                          "self_attn.q_proj", run_attn)]
    # With GQA, v_proj has fewer outputs than o_proj has inputs, so no per-channel fold exists
    # (llm-awq PR #67 checks the same shape equality).
    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:
        groups.append(_ScaleGroup(attn.v_proj, ["self_attn.o_proj"], "self_attn.o_proj",
                                  attn.o_proj))
    groups.append(_ScaleGroup(layer.post_attention_layernorm, ["mlp.gate_proj", "mlp.up_proj"],
                              "mlp.gate_proj", mlp))
    groups.append(_ScaleGroup(mlp.up_proj, ["mlp.down_proj"], "mlp.down_proj",
                              mlp.down_proj))
    return groups


def _search_scale(group: _ScaleGroup, lins: list[nn.Linear], gsizes: list[int], x: Tensor, zp: bool) -> Tensor:
    """Best s [K] over s = mean|x| ** ratio, ratio in {0, 1/20, ..., 19/20}; ratio 0 is plain RTN."""
    x_mean_abs = x.abs().mean(0)  # [K]
    org_out = group.inspect(x)
    originals = [lin.weight.data.clone() for lin in lins]
    best_loss, best_s = float("inf"), None
    for i in range(N_GRID):
        s = x_mean_abs.pow(i / N_GRID).clamp(min=MIN_SCALE)
        s = s / (s.max() * s.min()).sqrt()
        for lin, w, g in zip(lins, originals, gsizes):
            lin.weight.data = pseudo_quantize(w * s, g, zp) / s
        loss = (org_out - group.inspect(x)).float().pow(2).mean().item()
        if loss < best_loss:
            best_loss, best_s = loss, s
    for lin, w in zip(lins, originals):
        lin.weight.data = w
    if best_s is None:
        raise FloatingPointError(f"AWQ scale search for {group.names}: every candidate loss is NaN")
    return best_s


def _fold_scale(prev: nn.Module, lins: list[nn.Linear], s: Tensor) -> None:
    """prev's outputs / s, next linears' inputs * s: the float function is unchanged."""
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.view(-1, 1))
    else:
        prev.weight.div_(s)
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s)
    for lin in lins:
        lin.weight.mul_(s.view(1, -1))


def _search_clip(w: Tensor, x: Tensor, group: int, zp: bool) -> Tensor:
    """Per (out row, group) clip value [N, K/G] minimising the error of that group's partial dot
    product over up to 512 sampled tokens (auto_clip_layer)."""
    n, k = w.shape
    ng = k // group
    x = x[::max(1, x.shape[0] // N_SAMPLE_TOKENS)][:N_SAMPLE_TOKENS]
    xg = x.reshape(-1, ng, group).transpose(0, 1)  # (K/G, T, G)
    best = []
    for start in range(0, n, OC_BATCH):
        wg = w[start:start + OC_BATCH].reshape(-1, ng, group).transpose(0, 1)  # (K/G, b, G)
        org_out = torch.bmm(xg, wg.transpose(1, 2))  # (K/G, T, b)
        org_max = wg.abs().amax(dim=-1, keepdim=True)  # (K/G, b, 1)
        best_max, min_err = org_max.clone(), torch.full_like(org_max, float("inf"))
        for i in range(int(MAX_SHRINK * N_GRID)):
            max_val = org_max * (1 - i / N_GRID)
            clamped = torch.clamp(wg, -max_val, max_val).reshape(-1, group)
            q = pseudo_quantize(clamped, group, zp).reshape(wg.shape)
            err = (torch.bmm(xg, q.transpose(1, 2)) - org_out).pow(2).mean(dim=1).unsqueeze(-1)  # (K/G, b, 1)
            better = err < min_err
            min_err[better], best_max[better] = err[better], max_val[better]
        best.append(best_max.squeeze(-1).transpose(0, 1))  # (b, K/G)
    return torch.cat(best)


def _clip(lin: nn.Linear, max_val: Tensor) -> None:
    n, k = lin.weight.shape
    wg = lin.weight.data.reshape(n, max_val.shape[1], -1)  # (N, K/G, G)
    lin.weight.data = torch.clamp(wg, -max_val.unsqueeze(-1), max_val.unsqueeze(-1)).reshape(n, k)


def _awq_layer(layer: nn.Module, prefix: str, samples: list[_Sample], gsize: dict[str, int], clip: bool,
               zp: bool, bits: dict[str, int] | None, search: bool = True, gptq: bool = False,
               ranges: bool = False, act_order: bool = False) -> dict[str, QuantizedWeight]:
    """Search, fold and clip one decoder layer (search False: neither); advance `samples` to the next
    layer's inputs. With bits ({name: bits}) its linears are rounded here, on their (scaled) inputs:
    each group's range searched on them (ranges, range_search.py, in place of llm-awq's clip) and/or the
    codes picked by GPTQ (gptq; act_order: in act-order, gptq.ordered_inverse_hessian) -> {name: QuantizedWeight}."""
    feats, outs = _run_layer(layer, samples)
    mods = dict(layer.named_modules())
    groups = _scale_groups(layer, samples) if search else []
    # As llm-awq's auto_scale_block: search every group on the unmodified layer, then fold all.
    scales = [_search_scale(g, [mods[n] for n in g.names], [gsize[prefix + n] for n in g.names],
                            torch.cat(feats[g.feat]), zp)
              for g in groups]
    for g, s in zip(groups, scales):
        _fold_scale(g.prev, [mods[n] for n in g.names], s)
        scaled = [x / s for x in feats[g.feat]]        # every linear of a group reads the same input
        for n in g.names:
            feats[n] = scaled
    if clip and search and not ranges:
        for name, lin in mods.items():
            if isinstance(lin, nn.Linear) and not name.endswith(CLIP_SKIP):
                _clip(lin, _search_clip(lin.weight.data, torch.cat(feats[name]), gsize[prefix + name], zp))
    rounded = {}
    if bits is not None and (gptq or ranges):
        hessians = {}         # q/k/v and gate/up read one input: one H each
        for name, lin in mods.items():
            if not isinstance(lin, nn.Linear):
                continue
            key, b, g = (feats[name][0].data_ptr(), feats[name][0].shape), bits[prefix + name], gsize[prefix + name]
            if key not in hessians:
                h = hessian(torch.cat(feats[name]))
                hessians[key] = (h, (ordered_inverse_hessian if act_order else inverse_hessian)(h) if gptq else None)
            h, hinv = hessians[key]
            found = search_ranges(lin.weight.data, blocks_of_hessian(h, g), g, b, zp and b == 4) if ranges else None
            rounded[prefix + name] = (gptq_quantize(lin.weight.data, hinv, g, b, zp and b == 4, ranges=found)
                                      if gptq else found)
    # llm-awq (pre_quant.run_awq) computes the next layer's input with this layer before any scale
    # or clip is applied: the float outputs, not those of the scaled+clipped or quantized layer.
    for s, out in zip(samples, outs):
        s.hidden = out
    return rounded


def awq_transform(model: nn.Module, calib_embeds: list[Tensor], group: int = DEFAULT_GROUP,
                  auto_group: bool = False, clip: bool = True, progress: bool = True,
                  zero_point: bool = False) -> nn.Module:
    """Fold AWQ scales (and, with clip, clamp weights) into `model` in place; returns it. Without
    clip the result computes the same function as before (up to float rounding)."""
    return _transform(model, calib_embeds, group, auto_group, clip, progress, zero_point, None)[0]


@torch.no_grad()
def _transform(model: nn.Module, calib_embeds: list[Tensor], group: int, auto_group: bool, clip: bool,
               progress: bool, zero_point: bool, bits: dict[str, int] | None, search: bool = True,
               plan: dict | None = None, gptq: bool = False, ranges: bool = False, act_order: bool = False) -> tuple:
    """awq_transform, and with bits ({decoder linear: bits}) each linear rounded as its layer is done
    (_awq_layer: gptq, ranges) -> (model, {name: QuantizedWeight}). plan: G per linear kind
    (quantize.linear_groups)."""
    if type(model).__name__ not in SUPPORTED:
        raise QuantConfigError(f"AWQ supports {SUPPORTED}, got {type(model).__name__}")
    if not calib_embeds:
        raise QuantConfigError("calib_embeds is empty")
    model.eval()
    gsize = linear_groups(model, group, auto_group, plan)
    samples = _capture_first_inputs(model, calib_embeds)
    rounded = {}
    desc = ("AWQ" if search else "GPTQ" if gptq else "range search") + " layers"
    for i, layer in enumerate(tqdm(model.model.layers, desc=desc, disable=not progress)):
        rounded.update(_awq_layer(layer, f"model.layers.{i}.", samples, gsize, clip, zero_point, bits, search, gptq,
                                  ranges, act_order))
    return model, rounded


def awq_quantize(model: nn.Module, calib_embeds: list[Tensor], group: int = DEFAULT_GROUP,
                 progress: bool = True, auto_group: bool = False,
                 lm_head_bits: int = DEFAULT_LM_HEAD_BITS, zero_point: bool = False, int8: tuple = (),
                 gptq: bool = False, clip: bool = True, search: bool = True, plan: dict | None = None,
                 ranges: bool = False, act_order: bool = False) -> QuantizedLLM:
    """AWQ scale (+ clip) search on a copy of `model` (search False: neither, GPTQ alone), then int4 of
    every decoder linear (int8 for those in `int8`), rounded to nearest or by GPTQ on the (scaled)
    calibration inputs, and round-to-nearest of lm_head (llm-awq searches only inside the decoder
    blocks). plan: G per decoder linear kind (quantize.linear_groups), searched and stored at that G.
    ranges: each group's scale / zero point searched on the layer's calibration inputs
    (range_search.py) instead of llm-awq's clip (and kept by GPTQ). act_order: GPTQ rounds each linear's
    columns in act-order (needs gptq and ranges: the groups' ranges fixed first)."""
    if not (search or gptq or ranges):
        raise QuantConfigError("neither the AWQ search, a range search nor GPTQ: that is rtn_quantize")
    if act_order and not (gptq and ranges):
        raise QuantConfigError("act_order is an order of GPTQ's columns within fixed ranges: it needs gptq and ranges")
    bits = {name: 8 if name in int8 else 4 for name in decoder_linears(model)}
    folded, rounded = _transform(copy.deepcopy(model) if search else model, calib_embeds, group, auto_group, clip,
                                 progress, zero_point, bits, search, plan, gptq, ranges, act_order)
    method = ("awq+gptq" if gptq else "awq") if search else "gptq" if gptq else "range"
    return quantize_linears(folded, group, auto_group, method=method,
                            lm_head_bits=lm_head_bits, zero_point=zero_point, int8=int8, rounded=rounded, plan=plan)


def text_calibration_ids(tokenizer, texts: list[str], seqlen: int, n_samples: int) -> list[Tensor]:
    """n_samples blocks of seqlen token ids [T], cut from the concatenated tokenized texts as llm-awq's
    get_calib_dataset does."""
    ids = [i for t in texts for i in tokenizer(t, add_special_tokens=False)["input_ids"]]
    if len(ids) < seqlen * n_samples:
        raise QuantConfigError(f"calibration texts give {len(ids)} tokens, need {n_samples} x {seqlen}")
    return list(torch.tensor(ids[:seqlen * n_samples]).reshape(n_samples, seqlen))   # n x (T,)


@torch.no_grad()
def text_calibration_embeds(model: nn.Module, tokenizer, texts: list[str], seqlen: int,
                            n_samples: int) -> list[Tensor]:
    """text_calibration_ids, embedded: each [1, seqlen, C]."""
    embed = model.get_input_embeddings()
    return [embed(b.unsqueeze(0)).detach() for b in text_calibration_ids(tokenizer, texts, seqlen, n_samples)]


@torch.no_grad()
def layer_hessians(model: nn.Module, calib_embeds: list[Tensor]):
    """Per decoder layer i, (i, {decoder linear: H = x^T x / T, float32 [K, K]}) of its linears' inputs on
    the calibration samples, each layer fed the float outputs of the one before (as _transform); linears
    reading one input share one H. One layer at a time: a 3B model's H of every layer would not fit."""
    samples = _capture_first_inputs(model, calib_embeds)
    for i, layer in enumerate(model.model.layers):
        feats, outs = _run_layer(layer, samples)
        shared, out = {}, {}
        for name, xs in feats.items():
            key = xs[0].data_ptr()
            if key not in shared:
                x = torch.cat(xs).double()                                   # (sum T, K)
                shared[key] = (x.T @ x / x.shape[0]).float()
            out[f"model.layers.{i}.{name}"] = shared[key]
        for s, o in zip(samples, outs):
            s.hidden = o
        yield i, out
