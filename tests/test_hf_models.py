"""Real models people use, built from configs with random weights (no downloads): every
capture against the model's own reporting (``output_hidden_states``, ``output_attentions``)
and against step-by-step decoding with the cache."""

from __future__ import annotations

import pytest
import torch

import hookscope as hs

transformers = pytest.importorskip("transformers")


def assert_no_hooks(model: torch.nn.Module) -> None:
    """None of ours left (transformers installs hooks of its own for output_hidden_states)."""
    for name, m in model.named_modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            ours = [h for h in hooks.values()
                    if getattr(h, "__qualname__", "").startswith("Recorder.")]
            assert not ours, f"hookscope hook left on {name!r}"


def _padded_batch():
    ids = torch.randint(1, 100, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    return ids, mask


def test_bert_layers_equal_output_hidden_states_and_attentions(bert):
    ids, mask = _padded_batch()
    with hs.record(bert, ["encoder.layer.*", "encoder.layer.*.attention.self"]) as rec:
        out = bert(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    for i in range(3):
        layer = rec[f"encoder.layer.{i}"]
        assert torch.equal(layer.tensor, out.hidden_states[i + 1])
        probs = rec[f"encoder.layer.{i}.attention.self"].output[1]
        assert torch.equal(probs, out.attentions[i])
        # The model was called with attention_mask=: the capture knows where padding is.
        assert torch.equal(layer.mask, mask.bool())
    assert_no_hooks(bert)


def test_mask_from_can_be_turned_off(bert):
    ids, mask = _padded_batch()
    with hs.record(bert, ["encoder.layer.0"], mask_from=None) as rec:
        bert(ids, attention_mask=mask)
    assert rec["encoder.layer.0"].mask is None


def test_gpt2_generate_steps_equal_step_by_step_decoding():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4,
                                     n_positions=32, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    prompt = torch.randint(1, 50, (1, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), hs.record(model, ["", "transformer.h.1"]) as rec:
        generated = model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert rec.steps == 3 and generated.shape == (1, 7)

    # The reference: decode by hand with the cache, one token per step.
    block = model.transformer.h[1]
    seen = []
    handle = block.register_forward_hook(lambda m, i, o: seen.append(
        (o[0] if isinstance(o, tuple) else o).detach().clone()))
    try:
        with torch.no_grad():
            out = model(prompt, use_cache=True)
            cache = out.past_key_values
            for t in range(4, 6):
                out = model(generated[:, t : t + 1], past_key_values=cache, use_cache=True)
                cache = out.past_key_values
    finally:
        handle.remove()
    for step, expected in enumerate(seen):
        got = rec.step(step)["transformer.h.1"].tensor
        # generate() passes an explicit attention mask and cache positions, which may pick
        # another attention kernel than this plain loop: equal up to float32 rounding.
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    # The cache object the model returned at step 0 is a snapshot: its length is the
    # prompt's, not what the live cache grew to afterwards.
    first_cache = rec.step(0)[""].output["past_key_values"]
    last_cache = rec.step(-1)[""].output["past_key_values"]
    assert first_cache.get_seq_length() == 4 and last_cache.get_seq_length() == 6
    assert_no_hooks(model)


@pytest.mark.parametrize("masked", [True, False])
def test_fairseq_style_time_major_layers_are_read_along_the_batch(masked, tmp_path):
    """FSMT (fairseq's layout) runs its layers as (time, batch, features): exports gave one row
    per time step. The model call's (batch, time) mask or token ids tell the layout."""
    from hookscope.frame import capture_matrix

    torch.manual_seed(0)
    config = transformers.FSMTConfig(
        langs=["en", "de"], src_vocab_size=100, tgt_vocab_size=100, d_model=32,
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=64)
    model = transformers.FSMTModel(config).eval()
    ids, mask = _padded_batch()
    dec = torch.randint(4, 100, (3, 5), generator=torch.Generator().manual_seed(2))
    call = {"input_ids": ids, "decoder_input_ids": dec,
            **({"attention_mask": mask} if masked else {})}
    with hs.record(model, ["encoder.layers.1", "decoder.layers.1"]) as rec:
        out = model(**call)
    enc, dec_cap = rec["encoder.layers.1"], rec["decoder.layers.1"]
    assert (enc.batch_dim, dec_cap.batch_dim) == (1, 1)
    last = out.encoder_last_hidden_state  # (batch, time, d): the same values, batch first
    assert torch.equal(enc.tensor.transpose(0, 1), last)
    keep = mask.bool() if masked else torch.ones(3, 7, dtype=torch.bool)
    by_hand = (last * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
    torch.testing.assert_close(torch.as_tensor(capture_matrix(enc, reduce="mean")), by_hand)
    assert len(rec.to_frame(reduce="mean")) == 3  # one row per example, not per time step
    hs.record_dataset(model, [call, call], ["encoder.layers.1"], tmp_path / "ds",
                      reduce="mean", forward=lambda m, b: m(**b), progress=False)
    rows = hs.open_dataset(tmp_path / "ds").numpy("encoder.layers.1")
    assert rows.shape == (6, 32)
    torch.testing.assert_close(torch.tensor(rows[3:]), by_hand)


@pytest.mark.parametrize("masked", [True, False])
def test_clip_images_whose_shape_coincides_with_the_text_ids_swapped_stay_batch_first(
        masked, tmp_path):
    """5 prompts of 3 tokens beside 3 images of 5 positions: the image layer's (3, 5, d) is
    the text ids' (5, 3) swapped, by coincidence; the call's tensors disagree on the batch."""
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "vocab_size": 50,
                     "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 8, "patch_size": 4},
        projection_dim=8)
    model = transformers.CLIPModel(config).eval()
    ids, pixels = torch.randint(2, 50, (5, 3)), torch.randn(3, 3, 8, 8)
    call = {"input_ids": ids, "pixel_values": pixels}
    if masked:
        call["attention_mask"] = torch.ones(5, 3, dtype=torch.long)
        call["attention_mask"][0, 2:] = 0
    name = "vision_model.encoder.layers.0"
    with torch.no_grad(), hs.record(model, [name]) as rec:
        out = model(**call, output_hidden_states=True)
    by_hand = out.vision_model_output.hidden_states[1].mean(1)  # one row per image
    assert rec[name].batch_dim == 0 and rec[name].mask is None
    torch.testing.assert_close(torch.tensor(hs.recording_vectors(rec, reduce="mean")[name]),
                               by_hand)
    hs.record_dataset(model, [call], [name], tmp_path / "ds", reduce="mean",
                      forward=lambda m, b: m(**b), progress=False)
    torch.testing.assert_close(torch.tensor(hs.open_dataset(tmp_path / "ds").numpy(name)),
                               by_hand)
