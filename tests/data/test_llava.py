import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mgmlora.batch import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from mgmlora.data.images import load_rgb
from mgmlora.data.llava import LlavaFormatError, fit_after_expansion, read_llava_json, render, tokenize_record
from mgmlora.data.llava_datamodule import LlavaDataModule
from mgmlora.models.mgm_processor import CLIP_MEAN, CLIP_STD, PAD_COLOUR, MgmProcessor, preprocess
from tests.conftest import ASSETS, connect_data

MGM = MgmProcessor(image_tokens=36, max_length=512, size=48, size_aux=96)  # tiny-mgm's geometry

LLAVA = ASSETS / "llava"


@pytest.fixture(scope="module")
def gemma_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ASSETS / "gemma_tokenizer")


def _supervised(tok, sample):
    return tok.decode([t for t in sample.labels if t != IGNORE_INDEX])


def test_gemma_template_labels_answers_end_of_turn_and_eos(gemma_tok):
    record = {"id": "x", "image": "a.png", "conversations": [
        {"from": "gpt", "value": "dropped"},  # a leading gpt turn is dropped, as the original
        {"from": "human", "value": "Question one?\n<image>"}, {"from": "gpt", "value": "Answer one."},
        {"from": "human", "value": "Two?"}, {"from": "gpt", "value": "Answer two."}]}
    text, _ = render(MGM, record)
    assert text == ("<bos><start_of_turn>user\n<image>\nQuestion one?<end_of_turn>\n<start_of_turn>model\nAnswer one."
                    "<end_of_turn>\n<eos><start_of_turn>user\nTwo?<end_of_turn>\n<start_of_turn>model\nAnswer two."
                    "<end_of_turn>\n<eos>")
    sample = tokenize_record(gemma_tok, MGM, record)
    assert sample.input_ids.count(IMAGE_TOKEN_INDEX) == 1 and sample.input_ids[0] == gemma_tok.bos_token_id
    assert _supervised(gemma_tok, sample) == "Answer one.<end_of_turn>\n<eos>Answer two.<end_of_turn>\n<eos>"
    assert sample.labels[sample.input_ids.index(IMAGE_TOKEN_INDEX)] == IGNORE_INDEX


def test_text_only_records_have_no_image_token(gemma_tok):
    record = {"id": "t", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}
    sample = tokenize_record(gemma_tok, MGM, record)
    assert IMAGE_TOKEN_INDEX not in sample.input_ids and _supervised(gemma_tok, sample) == "Hello.<end_of_turn>\n<eos>"


def test_truncation_happens_after_expansion_and_never_leaves_zero_supervision(gemma_tok):
    records = read_llava_json(LLAVA / "llava_demo.json")
    sample = tokenize_record(gemma_tok, MGM, records[1])  # multi-turn, one image
    n = len(sample.input_ids)
    fitted = fit_after_expansion(sample, image_tokens=36, max_length=n + 35)
    assert len(fitted.input_ids) == n  # expanded length n - 1 + 36 fits exactly
    cut = fit_after_expansion(sample, image_tokens=36, max_length=n + 30)
    assert len(cut.input_ids) == n - 5 and cut.num_supervised > 0
    assert fit_after_expansion(sample, image_tokens=36, max_length=45) is None  # only the prompt would remain


def test_preprocessing_pads_non_square_and_greyscale_images_with_the_mean_colour(tmp_path):
    Image.new("L", (40, 20), 255).save(tmp_path / "grey.png")
    img = load_rgb(tmp_path / "grey.png")
    low, aux = preprocess(img, size_aux=96, size=48, aspect="pad")
    assert aux.shape == (3, 96, 96) and low.shape == (3, 48, 48)
    mean_normalised = torch.tensor([(c / 255 - m) / s for c, m, s in zip(PAD_COLOUR, CLIP_MEAN, CLIP_STD)])
    torch.testing.assert_close(aux[:, 0, 48], mean_normalised, atol=1e-6, rtol=0)  # top row: padding
    white = torch.tensor([(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    torch.testing.assert_close(aux[:, 48, 48], white, atol=1e-5, rtol=0)  # centre: the image
    torch.testing.assert_close(low, F.interpolate(aux[None], size=(48, 48), mode="bilinear")[0])
    _, cropped = preprocess(img, size_aux=96, size=48, aspect="square")
    torch.testing.assert_close(cropped[:, 0, 48], white, atol=1e-5, rtol=0)  # centre crop: no padding


@pytest.mark.parametrize("record,message", [
    ({"id": "a"}, "record 0 \\(id='a'\\): key 'conversations' must be a list"),
    ({"id": "b", "image": ["x.png"], "conversations": []}, "key 'image' must be a path string"),
    ({"id": "c", "conversations": [{"from": "bot", "value": "x"}]}, r"conversations\[0\] must be"),
    ({"id": "d", "image": "a.png", "conversations": [{"from": "human", "value": "<image> and <image>?"},
                                                     {"from": "gpt", "value": "Two."}]},
     r"record 0 \(id='d'\): 2 <image> tags .*one image per sample; keep one <image> tag"),
    ({"id": "e", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nA?"}, {"from": "gpt",
                                                     "value": "B."}, {"from": "human", "value": "<image>\nC?"},
                                                     {"from": "gpt", "value": "D."}]},
     r"2 <image> tags \(in conversations\[0, 2\]\)"),
    ({"id": "f", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A."}]},
     r"record 0 \(id='f'\): conversations\[0\] has an <image> tag but the record has no 'image' key; add"),
    ({"id": "g", "image": "a.png", "conversations": [{"from": "human", "value": "Q?"},
                                                     {"from": "gpt", "value": "<image> A."}]},
     r"the <image> tag is in a gpt turn \(conversations\[1\]\)"),
    ({"id": "h", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."},
                                   {"from": "gpt", "value": "B."}, {"from": "human", "value": "C?"}]},
     r"bad.json: record 0 \(id='h'\): conversations\[2\] is a gpt turn where a human turn belongs"),
])
def test_bad_records_are_named(tmp_path, record, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([record]))
    with pytest.raises(LlavaFormatError, match=message):
        read_llava_json(path)


def test_a_bad_jsonl_line_is_named_by_its_line_in_the_file(tmp_path):
    good = json.dumps({"id": "a", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]})
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([good, good, "", good[:-1], good]) + "\n")  # line 4 is cut short
    with pytest.raises(LlavaFormatError, match=r"bad.jsonl: not valid JSON at line 4 "):
        read_llava_json(path)


def _datamodule(tmp_path=None, records=None, **kwargs):
    train = LLAVA / "llava_demo.json"
    if records is not None:
        train = tmp_path / "train.json"
        train.write_text(json.dumps(records))
    dm = LlavaDataModule(str(train), tokenizer_path=str(ASSETS / "gemma_tokenizer"), batch_size=4,
                         **{"image_folder": str(LLAVA), **kwargs})
    connect_data(dm, preset="tiny-mgm").setup("fit")
    return dm


def test_datamodule_mixes_text_only_and_image_samples_in_batches():
    dm = _datamodule()
    assert dm.stats["train:samples"] == 30
    batch = next(iter(dm._eval_loader("train")))
    assert {k: tuple(v.shape) for k, v in batch.model_inputs.items()} == {"images": (1, 3, 48, 48),
                                                                          "images_aux": (1, 3, 96, 96)}
    text_only = [i for i, s in enumerate(dm.splits["train"]) if not s.meta.get("image")][0]
    _, _, inputs = dm._dataset(dm.splits["train"])[text_only]
    assert not inputs["images"].any() and not inputs["images_aux"].any()  # zero images for text-only, as MGM


def test_missing_image_is_an_error_naming_the_record_or_a_counted_skip(tmp_path):
    records = read_llava_json(LLAVA / "llava_demo.json")[:3]
    records[1]["image"] = "images/nope.png"
    with pytest.raises(OSError, match=r"record 1 \(id='img-01'\): image .*nope.png.*does not exist.*skip_bad_images"):
        _datamodule(tmp_path, records)
    dm = _datamodule(tmp_path, records, skip_bad_images=True)
    assert dm.stats["train:samples"] == 2 and dm.stats["train:skipped_bad_image"] == 1


def test_text_only_data_modules_refuse_an_mgm_model(tmp_path):
    from mgmlora.data.chameleons_datamodule import ChameleonsDataModule
    from mgmlora.data.datamodule import ChatDataModule
    from tests.conftest import TOKENIZER, TRAIN

    for dm in (ChatDataModule(str(TRAIN), tokenizer_path=str(TOKENIZER)),
               ChameleonsDataModule(str(ASSETS / "chameleons_demo.json"), tokenizer_path=str(TOKENIZER))):
        with pytest.raises(ValueError, match=rf"data.class_path \S+{type(dm).__name__} has no images but the model "
                                             r"\(mgm\) takes images.*"
                                             r"data.class_path: mgmlora.data.llava_datamodule.LlavaDataModule"):
            connect_data(dm, preset="tiny-mgm")
