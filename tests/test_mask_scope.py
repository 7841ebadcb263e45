"""The model call's padding mask goes to the part of the model it belongs to: the encoder's
`attention_mask` is not the decoder's, nor the vision tower's, even where their lengths are
the same; a part called with a mask of its own (a decoder's, audio frames') takes that one.

References: the masks the models themselves use (``decoder_attention_mask``, Wav2Vec2's frame
mask), and plain means of hand-written cloning hooks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hookscope as hs

TOL = {"rtol": 1e-5, "atol": 1e-6}


class _Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x, attention_mask=None):
        return self.layer(x)


class _TwoTowers(nn.Module):
    """CLIP's shape: the image tower runs first, then the text tower gets the mask."""

    def __init__(self) -> None:
        super().__init__()
        self.image = _Tower()
        self.text = _Tower()

    def forward(self, tokens, patches, attention_mask):
        image = self.image(patches).mean(1)
        return image + self.text(tokens, attention_mask=attention_mask).mean(1)


def _towers_batch():
    torch.manual_seed(0)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1, 3:] = 0
    mask[2, 1:] = 0
    return torch.randn(3, 5, 4), torch.randn(3, 5, 4), mask  # as many patches as tokens


def test_a_tower_the_mask_is_not_handed_to_gets_none_even_where_its_shape_fits(tmp_path):
    model = _TwoTowers().eval()
    tokens, patches, mask = _towers_batch()
    with torch.no_grad(), hs.record(model, ["image.layer", "text.layer"]) as rec:
        model(tokens, patches, attention_mask=mask)
    assert rec["image.layer"].mask is None
    assert torch.equal(rec["text.layer"].mask, mask.bool())
    with torch.no_grad():
        image = model.image.layer(patches)
    torch.testing.assert_close(
        torch.tensor(rec["image.layer"].to_frame(reduce="mean").to_numpy()), image.mean(1), **TOL)
    # record_dataset reduces in the hooks: the first batch, before the recorder knew where the
    # mask goes, is recorded again
    path = hs.record_dataset(model, [(tokens, patches, mask)] * 2, ["image.layer"],
                             tmp_path / "ds", reduce="mean", progress=False,
                             forward=lambda m, b: m(b[0], b[1], attention_mask=b[2]))
    torch.testing.assert_close(torch.tensor(hs.open_dataset(path).numpy("image.layer")),
                               torch.cat([image.mean(1)] * 2), **TOL)


def test_a_single_stream_model_keeps_the_model_calls_mask_everywhere():
    model = nn.Sequential(_Tower())  # the mask is never handed on: every capture may take it

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = model

        def forward(self, x, attention_mask):
            return self.body(x)

    tokens, _, mask = _towers_batch()
    w = Wrapper().eval()
    with torch.no_grad(), hs.record(w, ["body.0.layer", "body.0"]) as rec:
        w(tokens, attention_mask=mask)
    assert torch.equal(rec["body.0.layer"].mask, mask.bool())
    assert torch.equal(rec["body.0"].mask, mask.bool())


class _Embedded(nn.Module):
    """Funnel's and ESM's shape: embeddings fed the input ids, then an encoder handed the
    mask, then a head: one stream throughout."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(10, 4)
        self.encoder = _Tower()
        self.head = nn.Linear(4, 3)

    def forward(self, input_ids, attention_mask):
        return self.head(self.encoder(self.embeddings(input_ids), attention_mask=attention_mask))


def test_a_single_stream_that_hands_its_mask_to_a_part_keeps_it_everywhere():
    model = _Embedded().eval()
    ids = torch.randint(0, 10, (3, 5))
    _, _, mask = _towers_batch()
    with torch.no_grad(), hs.record(model, ["embeddings", "encoder.layer", "head", ""]) as rec:
        model(ids, attention_mask=mask)
    for name in ("embeddings", "encoder.layer", "head", ""):
        assert torch.equal(rec[name].mask, mask.bool()), name


transformers = pytest.importorskip("transformers")


def _t5():
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                num_decoder_layers=2, num_heads=4, decoder_start_token_id=0)
    return transformers.T5Model(cfg).eval()


def test_t5_the_encoders_mask_is_not_the_decoders():
    model = _t5()
    ids = torch.randint(1, 100, (3, 6))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 2 + [0] * 4])
    dec_ids = torch.randint(1, 100, (3, 6))  # as long as the source: the masks' shapes agree
    names = ["encoder.block.1", "decoder.block.1", "decoder.final_layer_norm",
             "encoder.embed_tokens", "decoder.embed_tokens"]
    with torch.no_grad(), hs.record(model, names) as rec:
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids)
    for name in ("encoder.block.1", "encoder.embed_tokens"):
        assert torch.equal(rec[name].mask, mask.bool())
    for name in ("decoder.block.1", "decoder.final_layer_norm", "decoder.embed_tokens"):
        assert rec[name].mask is None
    dec_mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1] * 6, [1] * 4 + [0] * 2])
    with torch.no_grad(), hs.record(model, names[:2]) as rec:
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids,
              decoder_attention_mask=dec_mask)
    assert torch.equal(rec["decoder.block.1"].mask, dec_mask.bool())
    assert torch.equal(rec["encoder.block.1"].mask, mask.bool())


def test_clip_the_text_mask_is_not_the_vision_towers():
    torch.manual_seed(0)
    text = transformers.CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=4,
                                       max_position_embeddings=32)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=4,
                                           image_size=32, patch_size=8)
    model = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)).eval()
    ids = torch.randint(1, 100, (2, 17))  # 17 tokens, as many as 16 patches and the class token
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[1, 5:] = 0
    names = ["vision_model.encoder.layers.0", "text_model.encoder.layers.0"]
    with torch.no_grad(), hs.record(model, names) as rec:
        out = model(input_ids=ids, pixel_values=torch.randn(2, 3, 32, 32), attention_mask=mask,
                    output_hidden_states=True)
    vision_cap = rec["vision_model.encoder.layers.0"]
    assert vision_cap.mask is None
    assert torch.equal(rec["text_model.encoder.layers.0"].mask, mask.bool())
    torch.testing.assert_close(torch.tensor(vision_cap.to_frame(reduce="mean").to_numpy()),
                               out.vision_model_output.hidden_states[1].mean(1), **TOL)


def test_wav2vec2_layers_take_the_mask_over_frames_the_model_computes():
    torch.manual_seed(0)
    cfg = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        conv_dim=(16, 16, 16), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3),
        num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4, feat_extract_norm="layer",
        do_stable_layer_norm=True, mask_time_prob=0.0)
    model = transformers.Wav2Vec2Model(cfg).eval()
    audio = torch.randn(3, 4000)
    mask = torch.zeros(3, 4000, dtype=torch.long)
    for i, n in enumerate([4000, 2500, 1200]):
        mask[i, :n] = 1
        audio[i, n:] = 0
    with torch.no_grad(), hs.record(model, ["encoder.layers.1"]) as rec:
        out = model(audio, attention_mask=mask, output_hidden_states=True)
    frames = model._get_feature_vector_attention_mask(out.hidden_states[2].shape[1], mask)
    cap = rec["encoder.layers.1"]
    assert torch.equal(cap.mask, frames.bool())
    real = [out.hidden_states[2][i, :n].mean(0) for i, n in enumerate(frames.sum(1).tolist())]
    torch.testing.assert_close(torch.tensor(rec.to_frame(reduce="mean").to_numpy()),
                               torch.stack(real), **TOL)


def _bart():
    torch.manual_seed(0)
    cfg = transformers.BartConfig(vocab_size=60, d_model=16, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2,
                                  encoder_ffn_dim=32, decoder_ffn_dim=32,
                                  max_position_embeddings=32)
    return transformers.BartForConditionalGeneration(cfg).eval()


def test_bart_with_its_head_the_decoder_has_no_mask_and_the_head_gets_the_decoders():
    model = _bart()
    ids = torch.randint(3, 60, (3, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    dec_ids = torch.randint(3, 60, (3, 6))
    names = ["model.encoder.layers.0", "model.decoder.layers.0", "lm_head"]
    recorder = hs.record(model, names)
    with torch.no_grad(), recorder as rec:  # (a reused recorder: several blocks)
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids)
    assert torch.equal(rec["model.encoder.layers.0"].mask, mask.bool())
    assert rec["model.decoder.layers.0"].mask is None
    assert rec["lm_head"].mask is None  # (it reads the decoder's output, not the source)
    dec_mask = torch.tensor([[1] * 6, [1] * 6, [1] * 3 + [0] * 3])
    with torch.no_grad(), recorder as rec:
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids,
              decoder_attention_mask=dec_mask)
    assert torch.equal(rec["model.decoder.layers.0"].mask, dec_mask.bool())
    assert torch.equal(rec["lm_head"].mask, dec_mask.bool())
    with torch.no_grad(), recorder as rec:  # the decoder's mask alone (Whisper's call)
        model(input_ids=ids, decoder_input_ids=dec_ids, decoder_attention_mask=dec_mask)
    assert torch.equal(rec["model.decoder.layers.0"].mask, dec_mask.bool())
    with torch.no_grad():  # the encoder run once, its outputs given (scoring many targets)
        encoded = model.model.encoder(input_ids=ids, attention_mask=mask)
    with torch.no_grad(), hs.record(model, ["model.decoder.layers.0"]) as rec:
        model(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=dec_ids)
    assert rec["model.decoder.layers.0"].mask is None


def test_token_and_lm_heads_keep_the_mask_of_the_stream_they_read():
    torch.manual_seed(0)
    bert = transformers.BertForTokenClassification(transformers.BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=5)).eval()
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=60, n_embd=16, n_layer=1, n_head=2, n_positions=32)).eval()
    ids = torch.randint(1, 60, (3, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])  # right padding
    with torch.no_grad(), hs.record(bert, ["classifier", "bert.encoder.layer.0"]) as rec:
        bert(ids, attention_mask=mask)
    assert torch.equal(rec["classifier"].mask, mask.bool())
    assert torch.equal(rec["bert.encoder.layer.0"].mask, mask.bool())
    with torch.no_grad(), hs.record(gpt2, ["lm_head"]) as rec:
        logits = gpt2(ids, attention_mask=mask).logits
    last = torch.stack([logits[i, n - 1] for i, n in enumerate(mask.sum(1).tolist())])
    torch.testing.assert_close(torch.tensor(rec.to_frame(reduce="last").to_numpy()), last,
                               **TOL)


def test_embeddings_inside_the_part_handed_the_mask_keep_it():
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32)).eval()
    ids = torch.randint(1, 60, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    names = ["bert.embeddings", "bert.embeddings.word_embeddings", "bert.encoder.layer.0"]
    with torch.no_grad(), hs.record(model, names) as rec:
        model(ids, attention_mask=mask)
    for name in names:
        assert torch.equal(rec[name].mask, mask.bool()), name


def test_t5s_lm_head_takes_the_decoders_mask_though_it_reads_a_scaled_copy(tmp_path):
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
        num_heads=4, decoder_start_token_id=0)).eval()
    ids = torch.randint(1, 100, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    dec_ids = torch.randint(1, 100, (2, 6))
    dec_mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1] * 6])
    with torch.no_grad(), hs.record(model, ["lm_head", "decoder.final_layer_norm"]) as rec:
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids,
                       decoder_attention_mask=dec_mask).logits
    assert torch.equal(rec["lm_head"].mask, dec_mask.bool())
    with torch.no_grad(), hs.record(model, ["lm_head"]) as rec:
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids)
    assert rec["lm_head"].mask is None
    batch = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec_ids,
             "decoder_attention_mask": dec_mask}
    path = hs.record_dataset(model, [batch], ["lm_head"], tmp_path / "ds", reduce="mean",
                             forward=lambda m, b: m(**b), progress=False)
    want = torch.stack([logits[i, : int(n)].mean(0) for i, n in enumerate(dec_mask.sum(1))])
    torch.testing.assert_close(torch.tensor(hs.open_dataset(path).numpy("lm_head")), want,
                               **TOL)
