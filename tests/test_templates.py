"""Exact prompt strings of each chat template, written out by hand from llava/conversation.py."""
from vila_edge_export.fixtures import QWEN2_TEMPLATE
from vila_edge.templates import get_template

Q = "<image>\nWhat is on the table?"


def test_vicuna_v1_single_and_multi_turn():
    t = get_template("vicuna_v1")
    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")
    assert t.render([("user", Q)]) == system + " USER: <image>\nWhat is on the table? ASSISTANT:"
    assert t.render([("user", "q1"), ("assistant", "a1"), ("user", "q2")]) == \
        system + " USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT:"
    assert t.stop_texts == ("</s>",)


def test_llama_3():
    t = get_template("llama_3")
    assert t.render([("user", Q)]) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision "
        "assistant. You are able to understand the visual content that the user provides, and assist the user "
        "with a variety of tasks using natural language.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "<image>\nWhat is on the table?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    two = t.render([("user", "q1"), ("assistant", "a1"), ("user", "q2")])
    assert two.endswith("q1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\na1<|eot_id|>"
                        "<|start_header_id|>user<|end_header_id|>\n\nq2<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_hermes_2():
    t = get_template("hermes-2")
    assert t.render([("user", Q)]) == ("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n"
                                       "<image>\nWhat is on the table?<|im_end|><|im_start|>assistant\n")


def test_auto_uses_the_tokenizer_template():
    t = get_template("auto", QWEN2_TEMPLATE)
    assert t.render([("user", "<image>What?")]) == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n<image>What?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert t.render([("user", "hi")], system="Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_custom_system_prompt():
    assert get_template("vicuna_v1").render([("user", "q")], system="S") == "S USER: q ASSISTANT:"
