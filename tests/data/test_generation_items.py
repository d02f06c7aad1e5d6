"""Generation items: the training prompts up to the assistant header, the references, and the seeded subset."""

from mgmlora.batch import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from mgmlora.data.chameleons_datamodule import ChameleonsDataModule
from mgmlora.data.datamodule import ChatDataModule
from mgmlora.data.generation_items import seeded_subset
from mgmlora.data.llava_datamodule import LlavaDataModule
from tests.conftest import ASSETS, TOKENIZER, VAL, connect_data


def _prompt_of(sample):
    """The training sample's ids before its first supervised token: what the model saw before answering."""
    first = next(i for i, y in enumerate(sample.labels) if y != IGNORE_INDEX)
    return sample.input_ids[:first]


def test_chameleons_items_are_the_training_prompts_and_targets_of_the_split():
    dm = connect_data(ChameleonsDataModule(str(ASSETS / "chameleons_demo.json"), tokenizer_path=str(TOKENIZER),
                                           max_length=512))
    dm.setup("fit")
    items = dm.generation_items("val", 32)
    assert [i.reference for i in items] == [d.target for d in dm.dialogues["val"]]
    for item, sample in zip(items, dm.splits["val"]):  # nothing was cut to fit here, so prompts line up
        assert item.prompt_ids == _prompt_of(sample)
    assert dm.reply_answer("[ANSWER]\nAye, sir.\n[/ANSWER]<|im_end|>") == "Aye, sir."


def test_chat_items_end_at_the_last_assistant_turn():
    dm = connect_data(ChatDataModule(str(VAL), val_path=str(VAL), tokenizer_path=str(TOKENIZER), max_length=256,
                                     train_on="last_assistant"))
    dm.setup("validate")
    items = dm.generation_items("val", 16)
    assert len(items) == len(dm.splits["val"])
    for item, sample, messages in zip(items, dm.splits["val"], dm.conversations["val"]):
        assert item.prompt_ids == _prompt_of(sample)
        assert item.reference == messages[-1]["content"].strip()


def test_llava_items_ask_the_first_question_with_its_image():
    llava = ASSETS / "llava"
    dm = connect_data(LlavaDataModule(str(llava / "llava_demo.json"), str(llava),
                                      val_path=str(llava / "llava_demo_val.json")), preset="tiny-mgm")
    dm.setup("validate")
    items = dm.generation_items("val", 16)
    assert len(items) == len(dm.splits["val"]) and all(i.image.startswith(str(llava)) for i in items)
    for item, sample in zip(items, dm.splits["val"]):
        assert item.prompt_ids == _prompt_of(sample) and IMAGE_TOKEN_INDEX in item.prompt_ids
    inputs = dm.item_inputs(items[0])
    assert inputs["images"].shape[-1] == dm.processor.size and inputs["images_aux"].shape[-1] == dm.processor.size_aux


def test_seeded_subset_is_fixed_sorted_and_whole_when_asked():
    picked = seeded_subset(100, 5, seed=3)
    assert picked == seeded_subset(100, 5, seed=3) == sorted(picked) and len(set(picked)) == 5
    assert picked != seeded_subset(100, 5, seed=4)
    assert seeded_subset(4, None, 0) == seeded_subset(4, 10, 0) == [0, 1, 2, 3]
