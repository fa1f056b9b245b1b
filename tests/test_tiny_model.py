"""vila-tiny-shapes: the scene generator, the bundled checkpoint's layout, and its accuracy.

The checkpoint is trained by trainers/tiny_shapes/train.py and committed; these tests check what a VILA1.5
loader relies on
(NVlabs/VILA@1c88211:llava/model/llava_arch.py save_pretrained), that the model answers held-out questions, and that its
fp16 and int4 engines answer as it does.
"""
import json
import os

import numpy as np
import pytest
import torch

from trainers.tiny_shapes import scenes
from trainers.tiny_shapes.evaluate import evaluate, heldout, torch_backend
from trainers.tiny_shapes.model import (IMAGE_TOKEN_INDEX, TinyVila, answer_ids, encode_conversation, render_prompt,
                               tokenize_prompt)

ROOT = os.path.join(os.path.dirname(__file__), "..", "models", "vila-tiny-shapes")
MAX_BYTES = 25 * 2 ** 20
# The first SLICE_ITEMS held-out items (balanced: categories cycle). The bundled checkpoint answers
# 37 of these 40 (0.925; 0.923 on the 300-item set, 0.910 on 1000); the floor leaves two items for
# fp32 differences between CPUs. Chance is ~0.29.
SLICE_ITEMS = 40
SLICE_FLOOR = 35 / 40
# int4 (AWQ, calibrated on scenes) may lose at most this many slice items against fp16; issue 5's
# bar is 2 points on the full set (measured: 0.898 against 0.910 on 1000 items).
INT4_SLICE_LOSS = 1


def _png_bytes(img):
    return np.asarray(img).tobytes()


def test_scenes_are_deterministic():
    a = [scenes.make_sample(5, i, multi_turn=0.5) for i in range(24)]
    b = [scenes.make_sample(5, i, multi_turn=0.5) for i in range(24)]
    assert [(s.category, s.turns, s.scenes) for s in a] == [(s.category, s.turns, s.scenes) for s in b]
    assert all(_png_bytes(scenes.render(x.scenes[0])) == _png_bytes(scenes.render(y.scenes[0])) for x, y in zip(a, b))
    c = [scenes.make_sample(6, i) for i in range(24)]
    assert [s.scenes for s in a] != [s.scenes for s in c]
    assert [s.turns for s in heldout(10)] == [s.turns for s in heldout(30)[:10]]   # prefix-stable


def test_scene_answers_match_the_scene():
    for i in range(200):
        s = scenes.make_sample(11, i)
        (q, a), = s.turns
        assert q.count("<image>") == len(s.scenes)
        sc = s.scenes[-1]
        if s.category in ("count", "fewshot_count"):
            shape = q.split("How many ")[1].split("s ")[0]
            assert str(sc.count(shape)) == a
        elif s.category == "exists":
            color, shape = q[:-1].split()[-2:]
            assert (a == "yes") == any((o.color, o.shape) == (color, shape) for o in sc.objects)
        elif s.category == "compare":
            shape = q.split("more ")[1].split("s?")[0]
            n0, n1 = (x.count(shape) for x in s.scenes)
            assert n0 != n1 and a == ("first" if n0 > n1 else "second")
        elif s.category == "color":
            shape = q.split("the ")[1][:-1]
            assert [o.color for o in sc.objects if o.shape == shape] == [a]


def test_extra_round_answers_match_the_scene():
    seen = set()
    for i in range(120):
        s = scenes.make_sample(13, i, categories=scenes.SINGLE, extra_rounds=3)
        assert len(s.turns) == 4 and s.turns[0][0].startswith("<image>\n")
        sc = s.scenes[0]
        for q, a in s.turns[1:]:
            assert "<image>" not in q
            words = q[:-1].split()
            if q.startswith("What color is the "):
                seen.add("color")
                assert [o.color for o in sc.objects if o.shape == words[-1]] == [a]
            elif q.startswith("Where is the "):
                seen.add("where")
                cells = [o.cell for o in sc.objects if o.shape == words[-1]]
                assert len(cells) == 1 and scenes.WHERE_CELLS[cells[0]] == a
            elif q.startswith("What shape is the "):
                seen.add("shape")
                assert [o.shape for o in sc.objects if o.color == words[-2]] == [a]
            elif q.startswith("How many "):
                seen.add("count")
                assert str(sc.count(words[2][:-1])) == a
            else:
                seen.add("exists")
                color, shape = words[-2:]
                assert (a == "yes") == any((o.color, o.shape) == (color, shape) for o in sc.objects)
    assert seen == set(scenes.SINGLE)


def _config():
    with open(os.path.join(ROOT, "config.json")) as f:
        return json.load(f)


def test_checkpoint_layout_and_config():
    for rel in ("config.json", "llm/config.json", "llm/model.safetensors", "llm/tokenizer.json",
                "llm/tokenizer_config.json", "llm/special_tokens_map.json", "vision_tower/config.json",
                "vision_tower/model.safetensors", "vision_tower/preprocessor_config.json",
                "mm_projector/config.json", "mm_projector/model.safetensors", "examples/README.md"):
        assert os.path.isfile(os.path.join(ROOT, rel)), rel
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ROOT) for f in fs)
    assert size <= MAX_BYTES
    cfg = _config()
    expect = {"architectures": ["LlavaLlamaModel"], "model_type": "llava_llama", "image_aspect_ratio": "resize",
              "mm_vision_select_layer": -2, "mm_vision_select_feature": "cls_patch", "mm_use_im_start_end": False,
              "mm_use_im_patch_token": False, "s2": False, "dynamic_s2": False, "model_dtype": "torch.bfloat16",
              "transformers_version": "4.36.2", "conv_mode": "vicuna_v1", "vision_resolution": -1}
    assert {k: cfg[k] for k in expect} == expect
    llm, vis = cfg["llm_cfg"], cfg["vision_tower_cfg"]
    assert cfg["hidden_size"] == llm["hidden_size"] and cfg["mm_hidden_size"] == vis["hidden_size"]
    assert llm["_name_or_path"] == "./llm" and llm["architectures"] == ["LlamaForCausalLM"]
    assert llm["tie_word_embeddings"] is False and llm["num_key_value_heads"] < llm["num_attention_heads"]
    assert llm["torch_dtype"] == "bfloat16" and vis["torch_dtype"] == "bfloat16"
    assert vis["_name_or_path"] == "./vision_tower" and vis["architectures"] == ["SiglipVisionModel"]
    assert vis["hidden_act"] == "gelu_pytorch_tanh" and vis["layer_norm_eps"] == 1e-6
    assert cfg["mm_projector_cfg"]["mm_projector_type"] == "mlp_downsample"
    with open(os.path.join(ROOT, "vision_tower", "preprocessor_config.json")) as f:
        pre = json.load(f)
    S = vis["image_size"]
    assert pre["size"] == {"height": S, "width": S} and pre["resample"] == 3
    assert pre["image_mean"] == [0.5] * 3 and pre["image_std"] == [0.5] * 3 and pre["rescale_factor"] == 1 / 255


def test_weights_are_bf16_with_vila_names():
    from safetensors import safe_open

    cfg = _config()
    C, H = cfg["mm_hidden_size"], cfg["hidden_size"]
    with safe_open(os.path.join(ROOT, "mm_projector", "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert shapes == {"layers.1.weight": (4 * C,), "layers.1.bias": (4 * C,), "layers.2.weight": (H, 4 * C),
                      "layers.2.bias": (H,), "layers.4.weight": (H, H), "layers.4.bias": (H,)}
    for sub, key in (("llm", "lm_head.weight"), ("vision_tower", "vision_model.embeddings.patch_embedding.weight")):
        with safe_open(os.path.join(ROOT, sub, "model.safetensors"), "pt") as f:
            assert key in f.keys() and f.get_tensor(key).dtype == torch.bfloat16


def test_checkpoint_reader_accepts_it():
    from vila_edge_export.checkpoint import read_checkpoint
    from vila_edge.families import COLUMN_MAJOR

    spec = read_checkpoint(ROOT)
    assert spec.template == "vicuna_v1" and spec.projector.token_order == COLUMN_MAJOR
    assert spec.projector.merge == 2 and spec.llm.kv_heads * 2 == spec.llm.heads


@pytest.fixture(scope="module")
def model():
    return TinyVila.load(ROOT)


def test_tokenizer_files_agree_and_round_trip(model):
    import tokenizers

    raw = tokenizers.Tokenizer.from_file(os.path.join(ROOT, "llm", "tokenizer.json"))
    tok = model.tokenizer
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    for s in heldout(16):
        prompt = render_prompt(s.turns)
        for chunk in prompt.split("<image>"):
            assert raw.encode(chunk).ids == tok(chunk).input_ids
            assert tok(chunk).input_ids[0] == tok.bos_token_id
        ans = s.turns[0][1]
        assert tok.decode(tok.encode(" " + ans, add_special_tokens=False)) == ans
    assert tok.decode(tok.encode(" answer text", add_special_tokens=False)) == "answer text"


def test_prompt_and_answer_tokens_meet_cleanly(model):
    tok = model.tokenizer
    for i in range(40):
        s = scenes.make_sample(3, i, multi_turn=1.0)
        ids, labels = encode_conversation(tok, s.turns)        # raises if an answer span differs
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert ids.count(IMAGE_TOKEN_INDEX) == len(s.scenes)
        prompt = tokenize_prompt(tok, render_prompt([(s.turns[0][0], None)]))
        assert ids[len(prompt):len(prompt) + len(answer_ids(tok, s.turns[0][1]))] == answer_ids(tok, s.turns[0][1])


def test_projector_uses_vila15_column_major_order(model):
    S = model.tower.config.image_size // model.tower.config.patch_size
    C = model.tower.config.hidden_size
    x = torch.randn(1, S * S, C)
    merged = model.projector.layers[0](x)[0]                   # (S2*S2, 4C)
    g, S2 = x[0].reshape(S, S, C), S // 2
    for i in range(S2):
        for j in range(S2):
            want = torch.cat([g[2 * i, 2 * j], g[2 * i, 2 * j + 1], g[2 * i + 1, 2 * j], g[2 * i + 1, 2 * j + 1]])
            assert torch.equal(merged[j * S2 + i], want)


@pytest.fixture(scope="module")
def torch_slice():
    torch.set_num_threads(2)
    return evaluate(torch_backend(ROOT), n=SLICE_ITEMS, keep_items=True)


@pytest.mark.slow
def test_heldout_slice_accuracy(torch_slice):
    assert torch_slice["overall"] >= SLICE_FLOOR, torch_slice


@pytest.mark.slow
def test_engines_answer_the_slice_like_the_checkpoint(torch_slice, tmp_path):
    """fp16 engine: the same answer as the torch model on every item; int4: at most
    INT4_SLICE_LOSS fewer right."""
    from vila_edge_export.build import ExportOptions, QuantOptions, export_engine
    from trainers.tiny_shapes.evaluate import pipeline_backend

    calib = tmp_path / "calib"
    scenes.main([str(calib), "--seed", "7", "-n", "16"])
    fp16, int4 = str(tmp_path / "fp16"), str(tmp_path / "int4")
    export_engine(ROOT, fp16, ExportOptions(dtype="fp16", progress=False))
    export_engine(ROOT, int4, ExportOptions(quant=QuantOptions("awq", calib_dir=str(calib)), progress=False))
    got16 = evaluate(pipeline_backend(fp16, threads=2), n=SLICE_ITEMS, keep_items=True)
    assert [it["answer"] for it in got16["items"]] == [it["answer"] for it in torch_slice["items"]]
    got4 = evaluate(pipeline_backend(int4, threads=2), n=SLICE_ITEMS)
    assert got4["correct"] >= got16["correct"] - INT4_SLICE_LOSS, got4
