import json

import pytest

from mgmlora.batch import IGNORE_INDEX
from mgmlora.data.chat import ChatTokenizer, DataFormatError, read_chat_jsonl
from tests.conftest import TRAIN, connect_data

CONV = [
    {"role": "system", "content": "You are DEX."},
    {"role": "user", "content": "Where are we going tomorrow?"},
    {"role": "assistant", "content": "Dude, totally. We head north."},
    {"role": "user", "content": "Shall we light a fire?"},
    {"role": "assistant", "content": "Whoa, chill. A small fire will keep the cold away."},
]


def _supervised_text(tokenizer, sample):
    return tokenizer.decode([t for t in sample.labels if t != IGNORE_INDEX])


def test_labels_cover_only_assistant_turns_and_their_end_of_turn_token(tokenizer):
    sample = ChatTokenizer(tokenizer, 512)(CONV)
    assert len(sample.input_ids) == len(sample.labels)
    assert _supervised_text(tokenizer, sample) == (
        "Dude, totally. We head north.<|im_end|>Whoa, chill. A small fire will keep the cold away.<|im_end|>")
    # every supervised position holds its own input token (labels are unshifted; the loss shifts)
    assert all(y in (IGNORE_INDEX, x) for x, y in zip(sample.input_ids, sample.labels))
    assert tokenizer.decode(sample.input_ids) == tokenizer.apply_chat_template(CONV, tokenize=False)


def test_last_assistant_only(tokenizer):
    sample = ChatTokenizer(tokenizer, 512, train_on="last_assistant")(CONV)
    assert _supervised_text(tokenizer, sample) == "Whoa, chill. A small fire will keep the cold away.<|im_end|>"


def test_truncation_drops_oldest_exchange_and_keeps_system_and_target(tokenizer):
    full = len(ChatTokenizer(tokenizer, 512)(CONV).input_ids)
    chat = ChatTokenizer(tokenizer, full - 1)
    sample = chat(CONV)
    text = tokenizer.decode(sample.input_ids)
    assert "You are DEX." in text and "Where are we going" not in text and "Shall we light a fire?" in text
    assert _supervised_text(tokenizer, sample).endswith("keep the cold away.<|im_end|>")
    assert chat.skipped == 0


def test_sample_whose_target_cannot_fit_is_skipped_and_counted(tokenizer):
    chat = ChatTokenizer(tokenizer, 12)
    assert chat(CONV) is None and chat.skipped == 1


def test_reads_the_bundled_sample():
    conversations = read_chat_jsonl(TRAIN)
    assert len(conversations) == 96 and conversations[0][0]["role"] == "system"


@pytest.mark.parametrize("line,message", [
    ("{not json", r"bad.jsonl:2: not valid JSON"),
    (json.dumps({"text": "hi"}), r"bad.jsonl:2: missing key 'messages'"),
    (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), r"bad.jsonl:2: messages\[0\].role is 'bot'; use one"),
    (json.dumps({"messages": [{"role": "user", "content": 3}]}), r"messages\[0\].content must be a string"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), r"no message has role 'assistant'"),
])
def test_bad_records_name_file_line_and_key(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": CONV}) + "\n" + line + "\n")
    with pytest.raises(DataFormatError, match=message):
        read_chat_jsonl(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_chat_jsonl(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("reader", ["chat", "llava", "chameleons"])
def test_bytes_that_are_not_utf8_are_named_by_file_line_and_column(tmp_path, reader):
    from mgmlora.data.chameleons import load_records
    from mgmlora.data.llava import read_llava_json

    read = {"chat": read_chat_jsonl, "llava": read_llava_json, "chameleons": load_records}[reader]
    path = tmp_path / "latin1.json"
    # a Latin-1 e-acute at line 2, column 12 (byte 22 of the file)
    path.write_bytes(b'[{"a": 1},\n {"b": "caf' + "\u00e9".encode("latin-1") + b'"}]\n')
    with pytest.raises(ValueError, match=r"latin1.json: line 2, column 12 \(byte 22\): byte 0xe9 is not UTF-8 .*"
                                         r"re-save the file as UTF-8"):
        read(path)


def test_a_missing_or_empty_tokenizer_directory_names_the_path_and_the_key(tmp_path):
    from mgmlora.data.datamodule import ChatDataModule

    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError, match=rf"data.init_args.tokenizer_path: tokenizer directory "
                                                rf"'{missing}' does not exist; set data.init_args.tokenizer_path"):
        connect_data(ChatDataModule(str(TRAIN), tokenizer_path=str(missing)))
    with pytest.raises(FileNotFoundError, match=r"data.init_args.tokenizer_path: .* holds no tokenizer"):
        connect_data(ChatDataModule(str(TRAIN), tokenizer_path=str(tmp_path)))

    from mgmlora.models.args import ModelArgs  # the model's tokenizer: the same check, its key
    from mgmlora.models.causal_lm import load_tokenizer  # the model's tokenizer: the same check, its key

    with pytest.raises(FileNotFoundError, match=r"model.model.tokenizer_path: tokenizer directory .* does not exist"):
        load_tokenizer(ModelArgs(preset="tiny-qwen3", tokenizer_path=str(missing)))


def test_the_test_stage_without_a_test_file_names_the_key_to_set():
    from mgmlora.data.datamodule import ChatDataModule
    from tests.conftest import TOKENIZER, VAL

    with pytest.raises(ValueError, match=r"`test` needs data.init_args.test_path"):
        connect_data(ChatDataModule(str(TRAIN), tokenizer_path=str(TOKENIZER))).setup("test")
    data = connect_data(ChatDataModule(str(TRAIN), test_path=str(VAL), tokenizer_path=str(TOKENIZER)))
    data.setup("test")
    assert len(data.splits["test"]) == len(VAL.read_text().splitlines()) and "train" not in data.splits


def test_conversations_keep_their_real_line_numbers_across_blank_lines(tmp_path):
    from mgmlora.data.chat import read_chat_lines
    from mgmlora.data.datamodule import ChatDataModule
    from tests.conftest import connect_data

    lines = TRAIN.read_text().splitlines()[:3]
    path = tmp_path / "gaps.jsonl"
    path.write_text(f"{lines[0]}\n\n\n{lines[1]}\n   \n{lines[2]}\n")  # conversations on lines 1, 4 and 6
    assert [n for n, _ in read_chat_lines(path)] == [1, 4, 6]
    data = connect_data(ChatDataModule(str(path), val_path=str(path), max_length=512))
    data.setup("fit")
    assert [item.key for item in data.generation_items("val", 8)] == ["line 1", "line 4", "line 6"]
    path.write_text(f"{lines[0]}\n\n{{not json\n")
    with pytest.raises(DataFormatError, match=r"gaps\.jsonl:3: not valid JSON"):
        read_chat_lines(path)


class _Counting:
    """A tokenizer that counts its tokenisations, the characters they read, and its chat-template renders."""

    def __init__(self, tokenizer):
        self._tokenizer, self.calls, self.chars, self.renders = tokenizer, 0, 0, 0

    def __call__(self, text, **kwargs):
        self.calls += 1
        self.chars += len(text)
        return self._tokenizer(text, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        self.renders += 1
        return self._tokenizer.apply_chat_template(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def _long_conversation(exchanges):
    messages = [{"role": "system", "content": "You are DEX."}]
    for i in range(exchanges):
        messages += [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]
    return messages


@pytest.mark.parametrize("exchanges", [10, 2000])
def test_a_conversation_of_thousands_of_exchanges_sets_up_in_linear_work(tokenizer, exchanges):
    """Turn dropping reads the conversation a fixed number of times, however many exchanges are dropped."""
    messages = _long_conversation(exchanges)
    counting = _Counting(tokenizer)
    sample = ChatTokenizer(counting, 64)(messages)
    rendered = len(tokenizer.apply_chat_template(messages, tokenize=False))
    assert counting.calls == 2 and counting.renders == 4  # the whole conversation, then the kept part; twice each
    assert counting.chars <= 2 * rendered  # at most the whole text twice, however many exchanges are dropped
    kept = ChatTokenizer(tokenizer, 10**6).encode(messages[:1] + messages[-2:])
    full = ChatTokenizer(tokenizer, 10**6).encode(messages[:1] + messages[-4:])
    assert len(kept.input_ids) <= 64 < len(full.input_ids)  # the limit keeps exactly the last exchange
    assert (sample.input_ids, sample.labels) == (kept.input_ids, kept.labels)
    counting.calls = counting.renders = 0
    ids, prompt = ChatTokenizer(counting, 64).fit_prompt(messages[:-1], 64 - 8)  # a generation prompt, the same way
    assert counting.calls == 2 and counting.renders == 4 and prompt == messages[:1] + messages[-2:-1]
    assert ids == ChatTokenizer(tokenizer, 64).prompt_ids(prompt)
