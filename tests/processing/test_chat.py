"""Vision placeholder expansion against transformers' Qwen3VLProcessor, and text ↔ token-id agreement."""
import types

import numpy as np
import pytest
import transformers
from packaging.version import Version
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.video_utils import VideoMetadata

from genevolve_jax.models.qwen3_vl import config as qwen_config
from genevolve_jax.processing import chat
from genevolve_jax.processing import image as image_processing

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


class _HFProcessor(Qwen3VLProcessor):
    """transformers' processor logic (replacement strings + text substitution) without its sub-processors."""
    all_special_multimodal_tokens = ["<|image_pad|>", "<|video_pad|>"]

    def __init__(self):
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.vision_start_token, self.vision_end_token = "<|vision_start|>", "<|vision_end|>"
        self.image_processor = types.SimpleNamespace(merge_size=2)
        self.video_processor = types.SimpleNamespace(merge_size=2, temporal_patch_size=2)

    def expand(self, texts, image_grid, video_grid, video_meta):
        imgs = {"image_grid_thw": np.asarray(image_grid)}
        vids = {"video_grid_thw": np.asarray(video_grid), "video_metadata": video_meta}
        ir = [self.replace_image_token(imgs, i) for i in range(len(image_grid))]
        vr = [self.replace_video_token(vids, i) for i in range(len(video_grid))]
        return self.get_text_with_replacements(list(texts), ir, vr)[0]


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["Describe the picture and the clip.", "<0.5 seconds> <12.3 seconds> user assistant system",
              "What changes between frames?"] * 20
    tok.train_from_iterator(corpus, trainer)
    return tok


def _ids_of(tok):
    return chat.VisionTokenIds(tok.token_to_id("<|image_pad|>"), tok.token_to_id("<|video_pad|>"),
                               tok.token_to_id("<|vision_start|>"), tok.token_to_id("<|vision_end|>"))


def _messages():
    return [[{"role": "system", "content": "You are helpful."},
             {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture"},
                                          {"type": "video"}, {"type": "text", "text": " and the clip."}]}],
            [{"role": "user", "content": [{"type": "video"}, {"type": "image"}, {"type": "image"},
                                          {"type": "text", "text": "What changes between frames?"}]}]]


# transformers 5.10–5.24 replaced only a video's pad and left the chat template's pair around its
# frames, unlike Qwen3-VL's own processor (transformers 4.57 … 5.9) and transformers >= 5.25; before
# 5.10 the processor had another API. The layout itself is pinned below without transformers.
ORACLE_AGREES = Version(transformers.__version__) >= Version("5.25")


@pytest.mark.skipif(not ORACLE_AGREES, reason=f"transformers {transformers.__version__}'s Qwen3-VL processor "
                                                "wraps videos in an extra vision_start/vision_end pair")
def test_expansion_equals_transformers_processor_on_a_batch():
    texts = [chat.render_messages(m) for m in _messages()]
    image_grid = [[1, 4, 6], [1, 2, 2], [1, 8, 4]]
    video_grid = [[2, 4, 4], [3, 2, 6]]
    frames = [[0, 12, 24, 36], [0, 5, 10, 15, 20]]           # the second pads its last frame in time
    fps = [24.0, 10.0]
    meta = [VideoMetadata(total_num_frames=40, fps=f, frames_indices=list(ix)) for f, ix in zip(fps, frames)]
    stamps = [image_processing.frame_timestamps(ix, f) for ix, f in zip(frames, fps)]
    want = _HFProcessor().expand(texts, image_grid, video_grid, meta)
    got = chat.expand_text(texts, image_grid, video_grid, stamps)
    assert got == want
    # one pair per image and per temporal patch: the template's pair around a video is replaced
    assert got[0].count("<|vision_start|>") == 1 + 2 and got[1].count("<|vision_end|>") == 3 + 2
    assert "picture<0.2 seconds><|vision_start|>" in got[0] and "<2.0 seconds><|vision_start|>" in got[1]


def test_video_layout_is_qwen3_vl_processors():
    # A wrapped pad loses its pair to the per-frame blocks; a bare pad (vLLM-style prompts) is
    # replaced alone. Grids (2, 2, 2) and (1, 2, 4): 1 and 2 merged tokens a frame.
    text = "a<|vision_start|><|video_pad|><|vision_end|>b<|video_pad|>c"
    grids, stamps = [[2, 2, 2], [1, 2, 4]], [[0.5, 1.5], [3.0]]
    frame = "<|vision_start|>{}<|vision_end|>"
    assert chat.expand_text(text, video_grid_thw=grids, video_timestamps=stamps) == (
        "a<0.5 seconds>" + frame.format("<|video_pad|>") + "<1.5 seconds>" + frame.format("<|video_pad|>")
        + "b<3.0 seconds>" + frame.format("<|video_pad|>" * 2) + "c")
    ids_of = chat.VisionTokenIds(image_pad=10, video_pad=11, vision_start=12, vision_end=13)
    stamp_ids = {"<0.5 seconds>": [90, 91], "<1.5 seconds>": [92], "<3.0 seconds>": [93]}
    out = chat.expand_ids([1, 12, 11, 13, 2, 11, 3], ids_of, video_grid_thw=grids, video_timestamps=stamps,
                          encode_text=stamp_ids.__getitem__)
    assert out.tolist() == [1, 90, 91, 12, 11, 13, 92, 12, 11, 13, 2, 93, 12, 11, 11, 13, 3]
    # A pad with a pair on one side only is bare: the lone start (end) stays.
    out = chat.expand_ids([12, 11, 5, 11, 13], ids_of, video_grid_thw=[[1, 2, 2], [1, 2, 2]],
                          video_timestamps=[[3.0], [3.0]], encode_text=stamp_ids.__getitem__)
    assert out.tolist() == [12, 93, 12, 11, 13, 5, 93, 12, 11, 13, 13]


def test_token_id_expansion_matches_tokenised_text_expansion(tokenizer):
    text = chat.render_messages(_messages()[0])
    image_grid, video_grid = [[1, 6, 4]], [[3, 4, 2]]
    stamps = [[0.25, 1.5, 12.3]]
    ids_of = _ids_of(tokenizer)
    ids = tokenizer.encode(text).ids
    got = chat.expand_ids(ids, ids_of, image_grid, video_grid, stamps,
                          encode_text=lambda s: tokenizer.encode(s).ids)
    want = tokenizer.encode(chat.expand_text(text, image_grid, video_grid, stamps)).ids
    np.testing.assert_array_equal(got, want)
    types_ = chat.mm_token_type_ids(got, ids_of)
    assert (types_ == 1).sum() == 6 and (types_ == 2).sum() == 3 * 2
    chat.check_placeholder_counts(got, ids_of, image_grid, video_grid)


def test_expand_ids_for_images_needs_no_text_encoder():
    cfg = qwen_config.tiny()
    ids_of = chat.VisionTokenIds.from_config(cfg)
    ids = [5, ids_of.vision_start, ids_of.image_pad, ids_of.vision_end, 7, ids_of.vision_start, ids_of.image_pad,
           ids_of.vision_end]
    out = chat.expand_ids(ids, ids_of, image_grid_thw=[[1, 2, 4], [1, 4, 4]])
    assert out.tolist() == ([5, ids_of.vision_start] + [ids_of.image_pad] * 2 + [ids_of.vision_end, 7,
                            ids_of.vision_start] + [ids_of.image_pad] * 4 + [ids_of.vision_end])


def test_mismatches_are_reported_before_any_compute():
    ids_of = chat.VisionTokenIds(10, 11, 12, 13)
    with pytest.raises(ValueError, match="2 <\\|image_pad\\|> placeholders but 1 images"):
        chat.expand_text("<|image_pad|>x<|image_pad|>", [[1, 2, 2]])
    with pytest.raises(ValueError, match="timestamps"):
        chat.expand_text("<|video_pad|>", video_grid_thw=[[2, 2, 2]])
    with pytest.raises(ValueError, match="2 temporal patches but only 1 timestamps"):
        chat.expand_text("<|video_pad|>", video_grid_thw=[[2, 2, 2]], video_timestamps=[[0.5]])
    with pytest.raises(ValueError, match="encode_text"):
        chat.expand_ids([11], ids_of, video_grid_thw=[[1, 2, 2]], video_timestamps=[[0.0]])
    with pytest.raises(ValueError,
                       match="1 image pad tokens in input_ids but image_grid_thw \\[\\[1, 4, 4\\]\\] gives 4"):
        chat.check_placeholder_counts([1, 10, 2], ids_of, image_grid_thw=[[1, 4, 4]])
    with pytest.raises(ValueError, match="merge_size"):
        chat.merged_tokens([1, 3, 4])
    with pytest.raises(ValueError, match="role 'robot'"):
        chat.render_messages([{"role": "robot", "content": "hi"}])
    with pytest.raises(ValueError, match="content part 0 has unknown type 'audio'"):
        chat.render_messages([{"role": "user", "content": [{"type": "audio"}]}])


def test_render_messages_layout():
    text = chat.render_messages(_messages()[0], add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are helpful.<|im_end|>\n"
                    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the picture"
                    "<|vision_start|><|video_pad|><|vision_end|> and the clip.<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert not chat.render_messages(_messages()[1], add_generation_prompt=False).endswith("assistant\n")
