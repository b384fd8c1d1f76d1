"""Chat data: ids and loss masks against transformers' apply_chat_template, built-in templates,
truncation, RAG as a chat, generation prompts, every error path, and a chat fine-tune."""
import json
import os
import warnings

import numpy as np
import pytest

from spmd_lora.data import (BUILTIN_CHAT_TEMPLATES, DataWarning, encode_prompt, load_records,
                            tokenize_records)
from spmd_lora.errors import ConfigError, DataError

# Llama-3-Instruct's chat template (the layout Meta ships with the tokenizer).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
# Llama-2-chat's layout: system prompt folded into the first user turn, [INST] ... [/INST].
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")
# The same two layouts with {% generation %} markers, for HF's assistant-token mask.
LLAMA3_MARKED = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% generation %}"
    "{{ m['content'] | trim + '<|eot_id|>' }}{% endgeneration %}{% else %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim"
    " + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
LLAMA2_MARKED = LLAMA2_TEMPLATE.replace(
    "{{ ' ' + content.strip() + ' ' + eos_token }}",
    "{% generation %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endgeneration %}")

SYS = {"role": "system", "content": "You are a helpful guide to small towns."}
CONVS = [
    [SYS, {"role": "user", "content": "In which year was Corholt founded?"},
     {"role": "assistant", "content": "Corholt was founded in 1275."}],
    [SYS, {"role": "user", "content": "Name a town on the Cordale River."},
     {"role": "assistant", "content": "Yardale lies on the banks of the Cordale River."},
     {"role": "user", "content": "  What is it known for?\n"},
     {"role": "assistant", "content": "Its boat festival every summer.\n"}],
    [{"role": "user", "content": "Give three tips for staying healthy."},
     {"role": "assistant", "content": "Eat well, sleep enough and walk every day."},
     {"role": "user", "content": "And one more?"},
     {"role": "assistant", "content": "Drink water."},
     {"role": "user", "content": "Thanks!"},
     {"role": "assistant", "content": "You are welcome."}],
]


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    """Llama-2-chat style: our sentencepiece tokenizer with Llama-2's chat template."""
    from transformers import AutoTokenizer

    from spmd_lora.tiny import build_tokenizer
    tok = AutoTokenizer.from_pretrained(str(build_tokenizer(tmp_path_factory.mktemp("sp"))))
    tok.chat_template = LLAMA2_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def bpe_tok():
    """Llama-3-Instruct style: a byte-level BPE trained on the bundled corpus with Llama-3's
    special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from spmd_lora.tiny import asset_text
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(asset_text("corpus.txt").splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|eot_id|>", chat_template=LLAMA3_TEMPLATE)


def records(convs):
    return [{"messages": c} for c in convs]


def hf_ids(tok, msgs, **kw):
    return list(tok.apply_chat_template(msgs, tokenize=True, return_dict=False, **kw))


@pytest.mark.parametrize("which", ["sp", "bpe"])
def test_ids_equal_apply_chat_template(sp_tok, bpe_tok, which):
    tok = sp_tok if which == "sp" else bpe_tok
    examples = tokenize_records(records(CONVS), tok, "chat", max_seq_len=512)
    assert len(examples) == len(CONVS)
    for ex, msgs in zip(examples, CONVS):
        assert ex.input_ids.tolist() == hf_ids(tok, msgs)
        assert ex.input_ids[0] == tok.bos_token_id and ex.input_ids[-1] == tok.eos_token_id
        assert ex.loss_mask[0] == 0


@pytest.mark.parametrize("which", ["sp", "bpe"])
def test_loss_mask_equals_hf_assistant_mask(sp_tok, bpe_tok, which):
    """Our mask (prefix renderings) equals HF's {% generation %} mask, on every assistant turn
    of multi-turn rows, end-of-turn token included."""
    tok = sp_tok if which == "sp" else bpe_tok
    marked = LLAMA2_MARKED if which == "sp" else LLAMA3_MARKED
    old = tok.chat_template
    tok.chat_template = marked
    try:
        examples = tokenize_records(records(CONVS), tok, "chat", max_seq_len=512)
        for ex, msgs in zip(examples, CONVS):
            out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)
            assert ex.input_ids.tolist() == list(out["input_ids"])
            assert ex.loss_mask.tolist() == list(out["assistant_masks"])
            # one run of targets per assistant turn, each ending with the end-of-turn token
            m = np.concatenate([[0], ex.loss_mask, [0]])
            run_ends = np.flatnonzero(np.diff(m) == -1) - 1
            assert len(run_ends) == sum(x["role"] == "assistant" for x in msgs)
            assert all(ex.input_ids[i] == tok.eos_token_id for i in run_ends)
    finally:
        tok.chat_template = old


def test_builtin_templates_render_the_reference_layouts(sp_tok, bpe_tok):
    for msgs in CONVS:
        for tok, name, ref in ((sp_tok, "llama2", LLAMA2_TEMPLATE),
                               (bpe_tok, "llama3", LLAMA3_TEMPLATE)):
            ours = tok.apply_chat_template(msgs, chat_template=BUILTIN_CHAT_TEMPLATES[name],
                                           tokenize=False)
            assert ours == tok.apply_chat_template(msgs, chat_template=ref, tokenize=False)
    chatml = bpe_tok.apply_chat_template(CONVS[0], chat_template=BUILTIN_CHAT_TEMPLATES["chatml"],
                                         tokenize=False, add_generation_prompt=True)
    assert chatml == ("<|im_start|>system\nYou are a helpful guide to small towns.<|im_end|>\n"
                      "<|im_start|>user\nIn which year was Corholt founded?<|im_end|>\n"
                      "<|im_start|>assistant\nCorholt was founded in 1275.<|im_end|>\n"
                      "<|im_start|>assistant\n")


def test_builtin_or_file_template_and_train_on_inputs(sp_tok, tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text(LLAMA2_TEMPLATE)
    a = tokenize_records(records(CONVS), sp_tok, "chat", 512, chat_template=str(f))
    b = tokenize_records(records(CONVS), sp_tok, "chat", 512, chat_template="llama2")
    for x, y in zip(a, b):
        assert x.input_ids.tolist() == y.input_ids.tolist()
        assert x.loss_mask.tolist() == y.loss_mask.tolist()
    full = tokenize_records(records(CONVS), sp_tok, "chat", 512, train_on_inputs=True)
    for ex in full:
        assert ex.loss_mask.tolist() == [0] + [1] * (len(ex) - 1)


def test_auto_detects_messages(bpe_tok):
    a = tokenize_records(records(CONVS), bpe_tok, "auto", 512)
    b = tokenize_records(records(CONVS), bpe_tok, "chat", 512)
    assert [x.input_ids.tolist() for x in a] == [x.input_ids.tolist() for x in b]


def test_long_conversations_drop_earliest_turns(bpe_tok):
    """Whole earliest exchanges go (system prompt kept); the rest is exactly the encoding of
    the shorter conversation; a last exchange that cannot fit is skipped; both counted."""
    conv = CONVS[2]
    sys_conv = [SYS] + conv
    n_last_two = len(hf_ids(bpe_tok, [SYS] + conv[2:]))
    with pytest.warns(DataWarning) as rec:
        out = tokenize_records(records([sys_conv, [SYS] + conv[:2]]), bpe_tok, "chat",
                               max_seq_len=n_last_two)
    assert out[0].input_ids.tolist() == hf_ids(bpe_tok, [SYS] + conv[2:])
    assert len(out) == 2
    assert any("1 of 2 conversations were longer" in str(w.message) for w in rec)
    long_answer = {"role": "assistant", "content": "word " * 300}
    with pytest.warns(DataWarning, match="skipped 1 of 2 examples whose last exchange exceeds"):
        out = tokenize_records(records([CONVS[0], [SYS, CONVS[0][1], long_answer]]), bpe_tok,
                               "chat", max_seq_len=128)
    assert len(out) == 1


def test_rag_rendered_as_chat(bpe_tok):
    from spmd_lora.tiny import sample_data_path
    recs = load_records(sample_data_path("rag"))[:4]
    full = tokenize_records(recs, bpe_tok, "rag", 4096, chat_template="llama3")
    for ex, r in zip(full, recs):
        ids = encode_prompt(r, bpe_tok, "rag", chat_template="llama3")
        assert ex.input_ids[:len(ids)].tolist() == ids
        answer = bpe_tok.decode(ex.input_ids[ex.loss_mask == 1])
        assert answer == r["answer"].strip() + "<|eot_id|>"
    budget = min(len(e) for e in full) - 40
    with pytest.warns(DataWarning, match="RAG examples were longer"):
        short = tokenize_records(recs, bpe_tok, "rag", budget, chat_template="llama3")
    for ex, r in zip(short, recs):
        assert len(ex) <= budget
        assert bpe_tok.decode(ex.input_ids[ex.loss_mask == 1]) == r["answer"].strip() + "<|eot_id|>"
        assert r["question"] in bpe_tok.decode(ex.input_ids)


def test_generation_prompt(bpe_tok):
    ids = encode_prompt({"messages": CONVS[1]}, bpe_tok, "chat")
    assert ids == hf_ids(bpe_tok, CONVS[1][:-1], add_generation_prompt=True)


@pytest.mark.parametrize("msgs,match", [
    ([], "field 'messages' is an empty conversation"),
    ("hello", "field 'messages' must be a list"),
    ([{"role": "bot", "content": "x"}], r"field 'messages\[0\].role' is 'bot'; it must be one of"),
    ([{"role": "user", "content": 3}], r"field 'messages\[0\].content' must be a string"),
    (["hi"], r"field 'messages\[0\]' must be an object"),
    ([{"role": "user", "content": "a"}, SYS, {"role": "assistant", "content": "b"}],
     "after the first message"),
    ([SYS], "only a system prompt"),
    ([SYS, {"role": "user", "content": "a"}], r"messages\[1\]' is a user turn; the last turn"),
])
def test_bad_messages_are_clear_errors(bpe_tok, tmp_path, msgs, match):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONVS[0]}) + "\n" + json.dumps({"messages": msgs}) + "\n")
    with pytest.raises(DataError, match=match) as e:
        tokenize_records(load_records(path), bpe_tok, "chat", 512)
    assert f"{path}, line 2" in str(e.value)


def test_template_errors(sp_tok, bpe_tok, tmp_path):
    plain = type(sp_tok).from_pretrained(sp_tok.name_or_path)
    plain.chat_template = None
    with pytest.raises(ConfigError, match="the tokenizer has no chat template; set chat_template"):
        tokenize_records(records(CONVS), plain, "chat", 512)
    with pytest.raises(ConfigError, match="neither a built-in"):
        tokenize_records(records(CONVS), bpe_tok, "chat", 512, chat_template="llama9")
    with pytest.raises(ConfigError, match="chat_template applies to chat and rag data"):
        tokenize_records([{"text": "abc"}], bpe_tok, "text", 512, chat_template="llama3")
    bad = tmp_path / "bad.jinja"   # writes the turn count last: not prefix-stable
    bad.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}{{ messages | length }}")
    with pytest.raises(ConfigError, match="not prefix-stable"):
        tokenize_records(records(CONVS), bpe_tok, "chat", 512, chat_template=str(bad))
    with pytest.raises(DataError, match="record 0: the chat template failed .*alternate"):
        tokenize_records(records([[SYS, CONVS[0][2]]]), sp_tok, "chat", 512)



def _alpaca_chats():
    """Chat rows from the bundled Alpaca sample: a system prompt, then one or two exchanges."""
    from spmd_lora.tiny import sample_data_path
    rows = [json.loads(x) for x in sample_data_path("alpaca").read_text().splitlines() if x]

    def exchange(r):
        user = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]
    system = {"role": "system", "content": "You are a helpful assistant."}
    chats = []
    for i in range(0, len(rows) - 1, 3):
        chats.append({"messages": [system] + exchange(rows[i])})
        chats.append({"messages": [system] + exchange(rows[i + 1]) + exchange(rows[i + 2])
                      if i + 2 < len(rows) else [system] + exchange(rows[i + 1])})
    return chats


def test_chat_finetune_lowers_held_out_loss_and_loads_in_peft(tmp_path, capsys):
    """A chat fine-tune (built-in llama2 template, assistant-only loss) of the tiny model
    lowers the loss on the assistant tokens of held-out conversations; its adapter gives the
    same logits in PEFT."""
    torch = pytest.importorskip("torch")   # PEFT comparison (not in the torch-free job)
    from test_peft_io import hf_logits, peft_model, rel_err
    from transformers import LlamaForCausalLM

    import spmd_lora
    from spmd_lora import cli
    from spmd_lora.evaluate import evaluate
    from spmd_lora.tiny import build_tiny_llama
    from spmd_lora.tokenizer import load_tokenizer
    from spmd_lora.train import TrainConfig, train

    model_dir = build_tiny_llama(tmp_path / "tiny", num_hidden_layers=1)
    chats = _alpaca_chats()
    held_out, train_rows = chats[:6], chats[6:]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in train_rows))
    train(TrainConfig(model=str(model_dir), data=str(data), output_dir=str(tmp_path / "out"),
                      template="chat", chat_template="llama2", tp=2, max_seq_len=384,
                      lora_rank=8, lora_alpha=16.0, lora_dropout=0.0, lora_targets=("all",),
                      learning_rate=1e-2, batch_size=4, epochs=2, warmup_steps=2, seed=0),
          progress_stream=open(os.devnull, "w"))

    tok = load_tokenizer(model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        held = tokenize_records(held_out, tok, "chat", 384, chat_template="llama2")
    base = spmd_lora.load_model(model_dir, tp=2)
    tuned = spmd_lora.load_model(model_dir, tp=2, adapter=tmp_path / "out" / "adapter")
    before, after = evaluate(base, held)["loss"], evaluate(tuned, held)["loss"]
    print(f"held-out assistant loss {before:.3f} -> {after:.3f}")
    assert after < before - 0.5, (before, after)

    # `spmd-lora eval` and `generate --template chat` render the same way.
    held_path = tmp_path / "held.jsonl"
    held_path.write_text("".join(json.dumps(c) + "\n" for c in held_out))
    common = ["--model", str(model_dir), "--adapter", str(tmp_path / "out" / "adapter"),
              "--tp", "2", "--chat-template", "llama2"]
    capsys.readouterr()
    assert cli.main(["eval", *common, "--data", str(held_path), "--template", "chat",
                     "--max-seq-len", "384"]) == 0
    assert abs(json.loads(capsys.readouterr().out)["loss"] - after) < 1e-5
    assert cli.main(["generate", *common, "--template", "chat", "--max-new-tokens", "3",
                     "--prompt", held_out[0]["messages"][1]["content"]]) == 0
    assert json.loads(capsys.readouterr().out)["prompt"] == held_out[0]["messages"][1]["content"]

    hf = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokens = held[0].input_ids[None, :64]
    ref = hf_logits(peft_model(hf, tmp_path / "out" / "adapter"), tokens)
    assert rel_err(ref, hf_logits(hf, tokens)) > 1e-2
    assert rel_err(tuned.logits(tokens), ref) <= 1e-4
