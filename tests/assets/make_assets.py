"""Builds the bundled sample data and the tiny tokenizer, offline and deterministically.

Run once from the repository root (`python tests/assets/make_assets.py`); the outputs are committed so that no test
or demo ever needs the network. The dialogues are synthetic: four invented characters, each with a fixed speaking
style, so that a tiny model has something learnable and the demo's loss falls visibly.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent

CHARACTERS = {
    "CAPTAIN MORROW": {
        "profile": "a weathered sea captain who speaks in short, salty sentences",
        "openers": ["Arr, steady now.", "Hold fast, sailor.", "By the tides,"],
        "closers": ["Mind the rigging.", "The sea waits for no one.", "Now get to the deck."],
    },
    "LADY WREN": {
        "profile": "a formal aristocrat who answers with elaborate courtesy",
        "openers": ["My dear friend,", "How very kind of you to ask;", "If I may be so bold,"],
        "closers": ["I remain ever at your service.", "Do give my regards to your family.", "How delightful."],
    },
    "DEX": {
        "profile": "a cheerful surfer who is relaxed about everything",
        "openers": ["Dude, totally.", "Whoa, chill.", "Oh man, no worries."],
        "closers": ["Catch you on the next wave.", "It's all good, bro.", "Stay stoked."],
    },
    "DR. VOSS": {
        "profile": "a precise scientist who answers with numbers and caveats",
        "openers": ["Strictly speaking,", "The data suggest", "To a first approximation,"],
        "closers": ["Error bars apply.", "Further experiments are needed.", "I will log this result."],
    },
}

TOPICS = [
    ("Where are we going tomorrow?", "we head north at first light"),
    ("Did you see the storm last night?", "the storm was loud but brief"),
    ("What should we eat for dinner?", "we eat whatever is fresh today"),
    ("Can you help me with this map?", "the map shows a path along the river"),
    ("Why are you awake so early?", "early hours are the quietest"),
    ("Who left the door open?", "the door was open before I arrived"),
    ("How long will the journey take?", "the journey takes about three days"),
    ("Is the old bridge safe to cross?", "the old bridge holds if we go one at a time"),
    ("What do you think of the new recruit?", "the new recruit learns quickly"),
    ("Shall we light a fire?", "a small fire will keep the cold away"),
]


def _answer(rng: random.Random, style: dict, fact: str) -> str:
    return f"{rng.choice(style['openers'])} {fact[0].upper() + fact[1:]}. {rng.choice(style['closers'])}"


def make_dialogues(n: int, seed: int) -> list[dict]:
    """Returns `n` chat records `{"messages": [...]}`, one character per record, 1-3 exchanges each."""
    rng = random.Random(seed)
    names = sorted(CHARACTERS)
    records = []
    for i in range(n):
        name = names[i % len(names)]
        style = CHARACTERS[name]
        messages = [{"role": "system", "content": f"You are {name}, {style['profile']}. Stay in character."}]
        for question, fact in rng.sample(TOPICS, k=rng.randint(1, 3)):
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant", "content": _answer(rng, style, fact)})
        records.append({"id": f"demo-{i:03d}", "character": name, "messages": messages})
    return records


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(corpus: list[str], out_dir: Path, vocab_size: int = 512) -> None:
    """Trains a byte-level BPE on `corpus` and saves it with a ChatML template (the layout Qwen3 uses)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<image>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 4096
    tok.save_pretrained(out_dir)


CHAMELEONS_DESCRIPTION = "基于角色在电影中的历史对话数据，模拟该角色的对话风格和行为模式"
PARTNERS = ["NORA", "SILAS", "BEA", "OTTO", "小林", "MIRA"]
GENDERS = {"CAPTAIN MORROW": "m", "LADY WREN": "f", "DEX": "m", "DR. VOSS": "?"}


def _user_hash(rng: random.Random) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(32))


def make_chameleons(seed: int) -> list[dict]:
    """Chameleons-format records (schema of docs/design/chameleons.md), invented text.

    Four characters; two of them have two records under the same user_hash, as in the real file. Some data_items
    end on the character's own turn (dropped by extraction), some have an empty context (kept), one partner line
    carries CJK text and an emoji so that Unicode round-trips are exercised.
    """
    rng = random.Random(seed)
    records = []
    for name in sorted(CHARACTERS):
        style, user_hash = CHARACTERS[name], _user_hash(rng)
        for _ in range(2 if name in ("DEX", "LADY WREN") else 1):
            items = []
            for _ in range(rng.randint(8, 14)):
                turns = []
                for question, fact in rng.sample(TOPICS, k=rng.randint(0, 3)):
                    partner = rng.choice(PARTNERS)
                    line = question if partner != "小林" else question + " 🙂 好吗？"
                    reply = _answer(rng, style, fact)
                    turns += [{"source": partner, "content": line}, {"source": name, "content": reply}]
                question, fact = rng.choice(TOPICS)
                if rng.random() < 0.9 or not turns:  # usually the partner speaks last: the item is kept
                    turns.append({"source": rng.choice(PARTNERS[:4]), "content": question})
                if rng.random() < 0.15:
                    turns = []  # the character's opening line
                items.append({"context": turns, "continuation": _answer(rng, style, fact)})
            records.append({
                "user_hash": user_hash,
                "user": {"profile": {"name": name, "gender": GENDERS[name]}},
                "task": {"description": CHAMELEONS_DESCRIPTION,
                         "task_behavior_collections": [{"type": "dialogue", "data": items}]},
            })
    return records


SHAPES = ["circle", "square", "triangle"]
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
QUESTIONS = ["What is in the image?", "Describe the image briefly.", "What colour is the shape?"]


def make_llava(out_dir: Path, seed: int) -> list[dict]:
    """Small synthetic images (one coloured shape each; some non-square, one greyscale) and LLaVA-format records
    (single- and multi-turn, plus text-only ones), so that the tiny MGM demo has something visual to learn."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(24):
        shape, colour = SHAPES[i % 3], sorted(COLOURS)[(i // 3) % 4]
        size = rng.choice([(64, 64), (80, 56), (48, 72)])
        img = Image.new("RGB", size, (245, 245, 245))
        draw, (w, h) = ImageDraw.Draw(img), size
        box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(w // 2, h // 4), (w // 4, 3 * h // 4), (3 * w // 4, 3 * h // 4)], fill=fill)
        if i == 5:
            img = img.convert("L")
        name = f"images/{i:02d}_{colour}_{shape}.png"
        img.save(out_dir / name)
        answer = f"A {colour} {shape} on a white background."
        conversations = [{"from": "human", "value": f"{rng.choice(QUESTIONS)}\n<image>" if i % 4 == 0
                          else f"<image>\n{rng.choice(QUESTIONS)}"}, {"from": "gpt", "value": answer}]
        if i % 6 == 1:
            conversations += [{"from": "human", "value": "What shape is it?"}, {"from": "gpt", "value": f"A {shape}."}]
        records.append({"id": f"img-{i:02d}", "image": name, "conversations": conversations})
    for j, (question, fact) in enumerate(TOPICS[:6]):
        answer = fact[0].upper() + fact[1:] + "."
        records.append({"id": f"text-{j}", "conversations": [{"from": "human", "value": question},
                                                            {"from": "gpt", "value": answer}]})
    return records


def build_gemma_tokenizer(corpus: list[str], out_dir: Path, vocab_size: int = 512) -> None:
    """A tiny byte-level BPE with Gemma's special tokens at Gemma's ids (pad 0, eos 1, bos 2, unk 3)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                  unk_token="<unk>", additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    tok.model_max_length = 4096
    tok.chat_template = (  # Gemma's layout (MGM's own training template is built in mgmlora.data.llava)
        "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    tok.save_pretrained(out_dir)


def main() -> None:
    train, val = make_dialogues(96, seed=0), make_dialogues(16, seed=1)
    for name, rows in (("persona_chat_train.jsonl", train), ("persona_chat_val.jsonl", val)):
        with open(HERE / name, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    chameleons = make_chameleons(seed=2)
    with open(HERE / "chameleons_demo.json", "w", encoding="utf-8") as f:
        json.dump(chameleons, f, indent=1, ensure_ascii=False)
    corpus = [m["content"] for r in train + val for m in r["messages"]] + ["system", "user", "assistant"]
    # The persona prompt's fixed text, so that the tiny tokenizer has merges for it too.
    from mgmlora.data.prompts import CHAMELEONS_TASK, CONTINUE, NOTE

    corpus += [CHAMELEONS_TASK, CONTINUE, NOTE, "[USER_HASH=", "[RECENT_DIALOGUE]", "[ANSWER]", "[/ANSWER]", "User:",
               "Assistant:", "[TASK]", "[HISTORY]", "[USER_PROFILE]", "[USER_NAME=", "[USER_GENDER="] * 20
    build_tokenizer(corpus, HERE / "tokenizer")
    llava = make_llava(HERE / "llava", seed=3)
    with open(HERE / "llava" / "llava_demo.json", "w", encoding="utf-8") as f:
        json.dump(llava, f, indent=1, ensure_ascii=False)
    # Validation: the same 24 images with other question wordings and no text-only records.
    val = [r for r in make_llava(HERE / "llava", seed=4) if "image" in r][::3]
    with open(HERE / "llava" / "llava_demo_val.json", "w", encoding="utf-8") as f:
        json.dump(val, f, indent=1, ensure_ascii=False)
    gemma_corpus = [t["value"] for r in llava for t in r["conversations"]] + ["user", "model", "<image>"] * 10
    build_gemma_tokenizer(gemma_corpus + corpus, HERE / "gemma_tokenizer")


if __name__ == "__main__":
    main()
