"""DPO rows through the SFT templates (issue 29): ``messages`` rows through the chat template,
rag rows through the oracle-aware passage fitting, TRL's conversational answers."""
from __future__ import annotations

import json
import warnings

import pytest

from spmd_lora.data.chat import ChatRenderer
from spmd_lora.data.preference import tokenize_pairs
from spmd_lora.errors import DataError


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from spmd_lora.tiny import build_tiny_llama
    from spmd_lora.tokenizer import load_tokenizer
    return load_tokenizer(build_tiny_llama(tmp_path_factory.mktemp("tiny"), num_hidden_layers=1))


CONVERSATION = [{"role": "system", "content": "Answer from the passages."},
                {"role": "user", "content": "Where is the lighthouse?"},
                {"role": "assistant", "content": "On the northern cape."},
                {"role": "user", "content": "And how tall is it?"}]


@pytest.mark.parametrize("shared", [True, False])
def test_chat_rows_render_like_the_whole_conversation(tok, shared):
    """Each row decodes to the chat template's rendering of the conversation with that answer
    as the assistant's turn, and the loss mask covers exactly the text after the generation
    prompt (the answer and the template's end-of-turn)."""
    renderer = ChatRenderer(tok, "chatml")
    rec = {"messages": CONVERSATION, "chosen": "It is forty metres tall.",
           "rejected": [{"role": "assistant", "content": "It is made of glass."}]}
    (pair,) = tokenize_pairs([rec], tok, 512, shared_prefix=shared, chat_template="chatml")
    prompt = renderer.render(CONVERSATION, add_generation_prompt=True)
    for ex, answer in ((pair.chosen, rec["chosen"]), (pair.rejected, "It is made of glass.")):
        whole = renderer.render(CONVERSATION + [{"role": "assistant", "content": answer}])
        assert tok.decode(ex.input_ids.tolist()) == whole
        answer_ids = [int(t) for t, m in zip(ex.input_ids, ex.loss_mask) if m]
        assert tok.decode(answer_ids) == whole[len(prompt):]
        assert answer in whole[len(prompt):]
    assert pair.prompt_len == len(renderer.encode_texts([prompt])[0][0])


def test_chat_row_errors_name_the_field(tok):
    bad_end = {"messages": CONVERSATION[:3], "chosen": "a", "rejected": "b"}
    with pytest.raises(DataError, match="must end with the turn the answers reply to"):
        tokenize_pairs([bad_end], tok, 512, chat_template="chatml")
    bad_answer = {"messages": CONVERSATION, "chosen": [{"role": "user", "content": "x"}],
                  "rejected": "b"}
    with pytest.raises(DataError, match="field 'chosen' must be a string or a list"):
        tokenize_pairs([bad_answer], tok, 512, chat_template="chatml")
    with pytest.raises(DataError, match="needs 'prompt', 'messages' or 'question'"):
        tokenize_pairs([{"chosen": "a", "rejected": "b"}], tok, 512)


@pytest.mark.parametrize("shared", [True, False])
def test_rag_rows_fit_passages_keeping_the_oracle(tok, shared):
    """A rag preference row longer than max_seq_len keeps its oracle passage and drops
    distractors (as SFT's rag template), instead of being skipped; the pair then fits."""
    filler = "the harbour master logs every ship that enters the bay at dawn " * 6
    passages = [{"title": f"Log {i}", "text": filler} for i in range(6)]
    passages[4] = {"title": "Lighthouse", "text": "The lighthouse on the cape is forty metres tall."}
    rec = {"question": "How tall is the lighthouse?", "contexts": passages, "oracle_index": [4],
           "chosen": "Forty metres.", "rejected": "The passages do not say."}
    (full,) = tokenize_pairs([rec], tok, 10_000, shared_prefix=shared)
    limit = len(full) // 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (pair,) = tokenize_pairs([rec], tok, limit, shared_prefix=shared)
    assert len(pair) <= limit < len(full)
    assert any("shortened the passages of 1" in str(w.message) for w in caught)
    prompt_text = tok.decode(pair.chosen.input_ids[:pair.prompt_len].tolist(),
                             skip_special_tokens=True)
    assert "forty metres tall" in prompt_text and prompt_text.count("harbour master") < 5 * 6   # distractors dropped
    assert prompt_text.rstrip().endswith("How tall is the lighthouse?\n\n### Answer:")


def test_cli_trains_dpo_on_chat_rows(tmp_path, capsys):
    from spmd_lora import cli
    from spmd_lora.tiny import build_tiny_llama
    model = build_tiny_llama(tmp_path / "tiny", num_hidden_layers=1)
    rows = [{"messages": CONVERSATION[:2 + (i % 2) * 2], "chosen": f"Answer {i}.",
             "rejected": f"Not {i}."} for i in range(4)]
    data = tmp_path / "chat_pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    rc = cli.main(["train", "--model", str(model), "--data", str(data), "--output-dir", str(out),
                   "--objective", "dpo", "--chat-template", "chatml", "--batch-size", "2",
                   "--max-steps", "2", "--max-seq-len", "128", "--no-census"])
    assert rc == 0, capsys.readouterr().err
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["pairs"] == 2 and "rewards/margins" in lines[-1]
