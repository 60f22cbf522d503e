"""MosaicBERT model: layouts, heads, save/load, Auto registration, ablation switches, presets, extrapolation."""

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
)

import mosaic_embed  # noqa: F401  (registers the Auto classes)
from mosaic_embed.model import (
    MosaicBertConfig,
    MosaicBertForMaskedLM,
    MosaicBertForSequenceClassification,
    MosaicBertModel,
    preset_config,
)
from mosaic_embed.model.blocks import MosaicBertLayerNorm

VOCAB = 128


def tiny(**overrides) -> MosaicBertConfig:
    return preset_config("mosaic-bert-tiny", **{"attn_impl": "torch", **overrides})


def batch(seed=0, b=3, s=12):
    """Random ids with ragged right padding: lengths s, s-5, 4."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, s - 5:] = 0
    mask[2, 4:] = 0
    ids = ids * mask  # pad id 0 at padding
    types = torch.zeros_like(ids)
    types[:, s // 2:] = 1
    return ids, mask, types * mask


def seeded(cls, config, seed=0):
    torch.manual_seed(seed)
    return cls(config).eval()


def test_padded_and_unpadded_paths_agree_and_padding_is_zero():
    ids, mask, types = batch()
    unpadded = seeded(MosaicBertModel, tiny())
    padded = seeded(MosaicBertModel, tiny(unpad=False))
    padded.load_state_dict(unpadded.state_dict())
    a = unpadded(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    b = padded(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert a.shape == (3, 12, 32)
    keep = mask.bool()
    torch.testing.assert_close(a[keep], b[keep], atol=1e-5, rtol=1e-5)
    assert torch.all(a[~keep] == 0)


def test_padding_does_not_change_real_tokens():
    """A sequence gives the same states alone and inside a padded batch (attention ignores padding)."""
    ids, mask, types = batch()
    model = seeded(MosaicBertModel, tiny())
    full = model(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    alone = model(ids[2:3, :4], token_type_ids=types[2:3, :4]).last_hidden_state
    torch.testing.assert_close(full[2:3, :4], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("unpad", [True, False])
def test_packed_input_matches_padded(unpad):
    ids, mask, types = batch()
    model = seeded(MosaicBertModel, tiny(unpad=unpad))
    padded = model(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    keep = mask.bool()
    lengths = mask.sum(1)
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    packed = model(ids[keep], token_type_ids=types[keep], cu_seqlens=cu, max_seqlen=int(lengths.max())).last_hidden_state
    assert packed.shape == (int(lengths.sum()), 32)
    torch.testing.assert_close(packed, padded[keep], atol=1e-5, rtol=1e-5)


def test_mlm_loss_only_on_labelled_positions_equals_full_logit_loss():
    ids, mask, types = batch()
    model = seeded(MosaicBertForMaskedLM, tiny())
    labels = torch.full_like(ids, -100)
    labels[0, [1, 5, 9]] = ids[0, [1, 5, 9]]
    labels[2, 2] = 7
    out = model(ids, attention_mask=mask, token_type_ids=types, labels=labels)  # eval mode: logits formed
    assert out.logits.shape == (4, VOCAB)
    no_logits = model(ids, attention_mask=mask, token_type_ids=types, labels=labels, return_logits=False)
    assert no_logits.logits is None  # the training default: the loss through the dispatch's mlm_loss
    torch.testing.assert_close(no_logits.loss, out.loss, atol=1e-5, rtol=1e-5)
    assert model.train()(ids, attention_mask=mask, token_type_ids=types, labels=labels).logits is None
    model.eval()
    full = model(ids, attention_mask=mask, token_type_ids=types).logits  # (B, S, V)
    assert full.shape == (3, 12, VOCAB)
    sel = labels != -100
    torch.testing.assert_close(out.logits, full[sel], atol=1e-5, rtol=1e-5)
    expected = torch.nn.functional.cross_entropy(full.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    no_labels = model(ids, attention_mask=mask, labels=torch.full_like(ids, -100))
    assert no_labels.loss.item() == 0.0 and no_labels.logits.shape == (0, VOCAB)


def test_classification_and_regression_heads():
    ids, mask, types = batch()
    clf = seeded(MosaicBertForSequenceClassification, tiny(num_labels=3))
    out = clf(ids, attention_mask=mask, token_type_ids=types, labels=torch.tensor([0, 2, 1]))
    assert out.logits.shape == (3, 3) and out.loss.ndim == 0
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 2, 1])))
    reg = seeded(MosaicBertForSequenceClassification, tiny(num_labels=1))
    target = torch.tensor([0.5, 1.5, 4.0])
    out = reg(ids, attention_mask=mask, labels=target)
    assert out.logits.shape == (3, 1)
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(out.logits.squeeze(-1), target))


def test_classifier_reads_first_real_token_under_left_padding():
    """Left padding: the pooled [CLS] is the first real token, so logits equal the unpadded sequence's."""
    model = seeded(MosaicBertForSequenceClassification, tiny(num_labels=2))
    ids = torch.tensor([[5, 6, 7, 8]])
    left = torch.tensor([[0, 0, 5, 6, 7, 8]])
    left_mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    for unpad in (True, False):
        model.config.unpad = unpad
        torch.testing.assert_close(model(left, attention_mask=left_mask).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    model.config.unpad = True


def test_save_load_round_trip_and_auto_classes(tmp_path):
    ids, mask, types = batch()
    model = seeded(MosaicBertForMaskedLM, tiny())
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), MosaicBertConfig)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is MosaicBertForMaskedLM
    assert loaded.mlm_head.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                               rtol=0, atol=0)
    backbone = AutoModel.from_pretrained(tmp_path).eval()
    assert type(backbone) is MosaicBertModel
    torch.testing.assert_close(backbone(ids, attention_mask=mask).last_hidden_state,
                               model.bert(ids, attention_mask=mask).last_hidden_state, rtol=0, atol=0)
    clf = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    assert type(clf) is MosaicBertForSequenceClassification and clf.classifier.out_features == 3
    assert torch.equal(clf.bert.encoder.layers[1].mlp.wi.weight, model.bert.encoder.layers[1].mlp.wi.weight)


def test_all_switches_off_is_bert_in_parameters_and_shapes():
    kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=128)
    ours = MosaicBertForMaskedLM(MosaicBertConfig(position="learned", mlp="gelu", unpad=False,
                                                  low_precision_layernorm=False, attn_impl="torch", **kw)).eval()
    bert = BertForMaskedLM(BertConfig(**kw)).eval()
    assert ours.num_parameters() == bert.num_parameters()
    ours_shapes = sorted(tuple(p.shape) for p in ours.parameters())
    bert_shapes = sorted(tuple(p.shape) for p in bert.parameters())
    # BERT keeps q, k, v as three (H, H) Linears; ours fuses them into one (3H, H): same numbers.
    assert sum(torch.Size(s).numel() for s in ours_shapes) == sum(torch.Size(s).numel() for s in bert_shapes)
    ids, mask, types = batch()
    assert ours(ids, attention_mask=mask).logits.shape == bert(ids, attention_mask=mask).logits.shape
    # GeGLU adds I*H per layer (and drops the first bias); ALiBi drops the position table.
    geglu = MosaicBertForMaskedLM(MosaicBertConfig(position="learned", mlp="geglu", **kw))
    assert geglu.num_parameters() - bert.num_parameters() == 2 * (64 * 32 - 64)
    alibi = MosaicBertForMaskedLM(MosaicBertConfig(position="alibi", mlp="gelu", **kw))
    assert bert.num_parameters() - alibi.num_parameters() == 128 * 32


def test_all_switches_off_matches_bert_outputs():
    """Copy BERT's weights in: with every switch off the logits are BERT's."""
    kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=128, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(**kw)).eval()
    ours = MosaicBertForMaskedLM(MosaicBertConfig(position="learned", mlp="gelu", unpad=False,
                                                  low_precision_layernorm=False, attn_impl="torch", **kw)).eval()
    sd = bert.state_dict()
    new = {
        "bert.embeddings.word_embeddings.weight": sd["bert.embeddings.word_embeddings.weight"],
        "bert.embeddings.token_type_embeddings.weight": sd["bert.embeddings.token_type_embeddings.weight"],
        "bert.embeddings.position_embeddings.weight": sd["bert.embeddings.position_embeddings.weight"],
        "bert.embeddings.norm.weight": sd["bert.embeddings.LayerNorm.weight"],
        "bert.embeddings.norm.bias": sd["bert.embeddings.LayerNorm.bias"],
        "mlm_head.dense.weight": sd["cls.predictions.transform.dense.weight"],
        "mlm_head.dense.bias": sd["cls.predictions.transform.dense.bias"],
        "mlm_head.norm.weight": sd["cls.predictions.transform.LayerNorm.weight"],
        "mlm_head.norm.bias": sd["cls.predictions.transform.LayerNorm.bias"],
        "mlm_head.decoder.weight": sd["bert.embeddings.word_embeddings.weight"],
        "mlm_head.decoder.bias": sd["cls.predictions.bias"],
    }
    for i in range(2):
        src, dst = f"bert.encoder.layer.{i}.", f"bert.encoder.layers.{i}."
        for part in ("weight", "bias"):
            new[dst + f"attention.Wqkv.{part}"] = torch.cat(
                [sd[src + f"attention.self.{n}.{part}"] for n in ("query", "key", "value")])
            new[dst + f"attention.out.{part}"] = sd[src + f"attention.output.dense.{part}"]
            new[dst + f"attention.norm.{part}"] = sd[src + f"attention.output.LayerNorm.{part}"]
            new[dst + f"mlp.wi.{part}"] = sd[src + f"intermediate.dense.{part}"]
            new[dst + f"mlp.wo.{part}"] = sd[src + f"output.dense.{part}"]
            new[dst + f"mlp.norm.{part}"] = sd[src + f"output.LayerNorm.{part}"]
    ours.load_state_dict(new, strict=True)
    ids, mask, types = batch()
    expected = bert(ids, attention_mask=mask, token_type_ids=types).logits
    got = ours(ids, attention_mask=mask, token_type_ids=types).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=1e-5)


def test_preset_parameter_counts():
    """Exact counts of MosaicBertForMaskedLM (tied decoder once); Base is the paper's 137 M within 1 %."""
    expected = {
        "mosaic-bert-base": 137_400_384,
        "mosaic-bert-large": 435_221_312,
        "mosaic-bert-small": 49_517_888,
        "mosaic-bert-mini": 12_116_544,
        "mosaic-bert-tiny": 26_528,
    }
    for name, count in expected.items():
        with torch.device("meta"):
            model = MosaicBertForMaskedLM(preset_config(name))
        assert model.num_parameters() == count, name
    assert abs(expected["mosaic-bert-base"] - 137e6) / 137e6 < 0.01
    assert MosaicBertConfig().to_dict() == preset_config("mosaic-bert-base").to_dict()


def test_alibi_extrapolates_to_four_times_the_configured_length():
    config = tiny(max_position_embeddings=128)
    model = seeded(MosaicBertModel, config)
    ids = torch.randint(1, VOCAB, (1, 4 * 128))
    out = model(ids).last_hidden_state
    assert out.shape == (1, 512, 32) and torch.isfinite(out).all()
    # The bias is built for the actual length: the first 128 positions see the far tokens, so outputs differ
    # from a 128-token run, while a learned-position model refuses the longer input.
    assert not torch.allclose(out[:, :128], model(ids[:, :128]).last_hidden_state)
    long = model(torch.randint(1, VOCAB, (1, 16 * 128))).last_hidden_state  # 2048 tokens
    assert long.shape == (1, 2048, 32) and torch.isfinite(long).all()
    learned = seeded(MosaicBertModel, tiny(position="learned"))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        learned(ids)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="vocab_size"):
        MosaicBertConfig(vocab_size=30522)
    with pytest.raises(ValueError, match="position"):
        tiny(position="rotary")
    with pytest.raises(ValueError, match="mlp"):
        tiny(mlp="swiglu")
    with pytest.raises(ValueError, match="attn_impl"):
        tiny(attn_impl="flash")
    with pytest.raises(ValueError, match="attn_impl"):
        preset_config("mosaic-bert-tiny", unpad=False, attn_impl="triton")
    with pytest.raises(ValueError, match="num_attention_heads"):
        tiny(num_attention_heads=5)
    with pytest.raises(ValueError, match="preset"):
        preset_config("mosaic-bert-huge")


def test_architecture_reads_a_saved_config_without_transformers(tmp_path):
    """``MosaicBertArchitecture.from_folder`` (the Encoder's transformers-free read) gives the saved config's
    fields, ignores what transformers adds, and names the file for another model type or a bad field."""
    import dataclasses
    import json

    from mosaic_embed.model.architecture import MosaicBertArchitecture

    config = preset_config("mosaic-bert-tiny", position="learned", layernorm_impl="torch", hidden_dropout_prob=0.0)
    config.save_pretrained(tmp_path)
    arch = MosaicBertArchitecture.from_folder(tmp_path)
    for field in dataclasses.fields(MosaicBertArchitecture):
        assert getattr(arch, field.name) == getattr(config, field.name), field.name
    assert arch.impl_for("layernorm") == "torch" and arch.model_type == "mosaic_bert"
    # one definition: the transformers config is the architecture plus transformers' own fields
    assert isinstance(config, MosaicBertArchitecture)
    saved = json.loads((tmp_path / "config.json").read_text())
    for bad, match in (({**saved, "model_type": "bert"}, "model_type 'bert'"),
                       ({**saved, "hidden_size": "32"}, "hidden_size"),
                       ({**saved, "vocab_size": 100}, "vocab_size")):
        (tmp_path / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match) as err:
            MosaicBertArchitecture.from_folder(tmp_path)
        assert "config.json" in str(err.value)
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match="config.json: not a JSON"):
        MosaicBertArchitecture.from_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        MosaicBertArchitecture.from_folder(tmp_path / "missing")


def test_triton_requested_on_cpu_is_an_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = seeded(MosaicBertModel, preset_config("mosaic-bert-tiny", attn_impl="triton"))
    with pytest.raises((RuntimeError, ValueError), match="triton"):
        model(torch.randint(1, VOCAB, (2, 5)))


def test_low_precision_layernorm_runs_in_autocast_dtype():
    x = torch.randn(4, 32)
    lp = MosaicBertLayerNorm(32, 1e-12, low_precision=True)
    fp = MosaicBertLayerNorm(32, 1e-12, low_precision=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lp(x).dtype == torch.bfloat16
        assert fp(x).dtype == torch.float32
    assert lp(x).dtype == torch.float32  # no autocast: plain LayerNorm
    torch.testing.assert_close(lp(x), fp(x))


def test_triton_path_matches_torch_path_in_the_model():
    """The dispatch reaches the Triton kernel (Triton's CPU interpreter without CUDA) and agrees with torch."""
    pytest.importorskip("mosaic_embed.kernels.flash_attn_alibi")
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = dict(hidden_size=64, num_attention_heads=4)  # head dim 16, the kernel's smallest
    torch_model = seeded(MosaicBertForMaskedLM, tiny(**cfg)).to(device)
    triton_model = seeded(MosaicBertForMaskedLM, tiny(attn_impl="triton", **cfg)).to(device)
    ids, mask, types = (t.to(device) for t in batch())
    labels = torch.where(mask.bool(), ids, -100)
    a = torch_model(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    b = triton_model(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    torch.testing.assert_close(b.logits, a.logits, atol=2e-3, rtol=2e-3)
    a.loss.backward()
    b.loss.backward()
    ga = torch_model.bert.encoder.layers[0].attention.Wqkv.weight.grad
    gb = triton_model.bert.encoder.layers[0].attention.Wqkv.weight.grad
    torch.testing.assert_close(gb, ga, atol=2e-3, rtol=2e-2)


def test_attention_dropout_switch():
    """attention_probs_dropout_prob > 0 makes training forwards stochastic and leaves eval unchanged."""
    ids, mask, _ = batch()
    plain = seeded(MosaicBertModel, tiny(hidden_dropout_prob=0.0))
    dropped = seeded(MosaicBertModel, tiny(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.3))
    dropped.load_state_dict(plain.state_dict())
    torch.testing.assert_close(dropped(ids, attention_mask=mask).last_hidden_state,
                               plain(ids, attention_mask=mask).last_hidden_state, atol=0, rtol=0)
    plain.train()
    dropped.train()
    torch.testing.assert_close(plain(ids, attention_mask=mask).last_hidden_state,
                               plain(ids, attention_mask=mask).last_hidden_state, atol=0, rtol=0)
    a = dropped(ids, attention_mask=mask).last_hidden_state
    b = dropped(ids, attention_mask=mask).last_hidden_state
    assert not torch.allclose(a, b)


def test_position_switch_alibi_is_shift_invariant_learned_is_not():
    """ALiBi sees only relative distance: moving every position by 3 changes nothing; learned positions do."""
    ids = torch.randint(1, VOCAB, (1, 6))
    for position, invariant in (("alibi", True), ("learned", False)):
        model = seeded(MosaicBertModel, tiny(position=position))
        base = model(ids).last_hidden_state
        shifted = model(ids, position_ids=torch.arange(3, 9)[None]).last_hidden_state
        assert torch.allclose(base, shifted, atol=1e-6) is invariant, position


def test_mlp_switch_geglu_is_gated():
    """GeGLU: zeroing the V half of wi zeroes the MLP branch; the GELU MLP has no such half."""
    model = seeded(MosaicBertModel, tiny())
    mlp = model.encoder.layers[0].mlp
    assert mlp.wi.weight.shape == (2 * 64, 32) and mlp.wi.bias is None
    x = torch.randn(5, 32)
    with torch.no_grad():
        mlp.wi.weight[64:] = 0  # V = 0
    torch.testing.assert_close(mlp(x), mlp.norm(x))
    gelu = seeded(MosaicBertModel, tiny(mlp="gelu")).encoder.layers[0].mlp
    assert gelu.wi.weight.shape == (64, 32) and gelu.wi.bias is not None


def test_low_precision_layernorm_switch_in_the_model():
    ids, mask, _ = batch()
    for low, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        model = seeded(MosaicBertForMaskedLM, tiny(low_precision_layernorm=low))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, attention_mask=mask, output_hidden_states=True)
        assert out.hidden_states[-1].dtype == dtype
        assert torch.isfinite(out.logits.float()).all()


def test_bf16_autocast_training_step_and_gradient_checkpointing():
    ids, mask, _ = batch()
    labels = torch.where(mask.bool(), ids, -100)
    grads = []
    for checkpointing in (False, True):
        model = seeded(MosaicBertForMaskedLM, tiny(hidden_dropout_prob=0.0)).train()
        if checkpointing:  # transformers 5.23 renamed the method; 5.17 has only the old name
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable({"use_reentrant": False})
            assert model.bert.encoder.layers[0].gradient_checkpointing
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        assert all(torch.isfinite(g).all() for g in grads[-1].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_hidden_states_and_tuple_output():
    ids, mask, _ = batch()
    model = seeded(MosaicBertModel, tiny())
    out = model(ids, attention_mask=mask, output_hidden_states=True)
    assert len(out.hidden_states) == 3 and all(h.shape == (3, 12, 32) for h in out.hidden_states)
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)
    as_tuple = model(ids, attention_mask=mask, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.last_hidden_state)


def test_packed_encoder_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) traces the whole packed path after ``warm_dispatch``, as pretraining and the
    Encoder compile it (the dispatch answers traced questions, e.g. the LayerNorm's, outside the graph)."""
    from mosaic_embed.kernels.dispatch import warm_dispatch

    model = seeded(MosaicBertModel, tiny())
    lengths = [5, 9, 3]
    ids = torch.randint(1, VOCAB, (sum(lengths),))
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    expected = model(ids, cu_seqlens=cu, max_seqlen=9).last_hidden_state
    warm_dispatch(model, "cpu", torch.float32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(ids, cu_seqlens=cu, max_seqlen=9).last_hidden_state, expected,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn_impl, geglu_impl, expected", [("torch", None, "torch"), ("auto", None, "auto"),
                                                             ("torch", "auto", "auto")])
def test_one_dispatch_decides_both_kernels(monkeypatch, attn_impl, geglu_impl, expected):
    """attn_impl="torch" is the exact reference end to end: GeGLU follows it unless geglu_impl says otherwise."""
    from mosaic_embed.kernels import dispatch
    from mosaic_embed.model import MosaicBertModel, preset_config

    asked = []
    real = dispatch.resolve_impl

    def spy(kernel, impl, *args, **kwargs):
        asked.append((kernel, impl))
        return real(kernel, impl, *args, **kwargs)

    monkeypatch.setattr(dispatch, "resolve_impl", spy)
    model = MosaicBertModel(preset_config("mosaic-bert-tiny", attn_impl=attn_impl, geglu_impl=geglu_impl)).eval()
    with torch.no_grad():
        model(torch.randint(5, 128, (2, 7)))
    assert ("geglu", expected) in asked and ("attention", attn_impl) in asked
    assert {impl for kernel, impl in asked if kernel == "geglu"} == {expected}
    with pytest.raises(ValueError, match="geglu_impl"):
        preset_config("mosaic-bert-tiny", geglu_impl="cuda")


def test_alibi_slopes_cached_per_device_fp32_and_trainable_after_inference_mode():
    """The slopes are made once per device (no host copy per forward), stay fp32 in a bf16 model, and a
    first forward under inference_mode does not leave an inference tensor that training cannot save."""
    model = seeded(MosaicBertModel, tiny())
    ids, mask, types = batch()
    with torch.inference_mode():
        model(ids, attention_mask=mask, token_type_ids=types)
    cached = model.encoder.slopes_on(torch.device("cpu"))
    assert cached is model.encoder.slopes_on(torch.device("cpu")) and cached.dtype == torch.float32
    assert not cached.is_inference()
    model.train()
    out = model(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    out.float().pow(2).mean().backward()  # the attention saves the cached slopes for backward
    assert model.encoder.layers[0].attention.Wqkv.weight.grad is not None
    model.to(torch.bfloat16)
    assert model.encoder.slopes_on(torch.device("cpu")).dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_packed_forward_never_synchronises_the_gpu():
    """A packed forward queues its work without waiting for the GPU (the Encoder relies on it to run ahead):
    torch's sync debug mode turns any synchronising call into an error."""
    # head_dim 32: the Triton kernels run (the Encoder's path); tiny's head_dim 8 would take the torch path
    cfg = preset_config("mosaic-bert-tiny", hidden_size=64, num_attention_heads=2, intermediate_size=128)
    model = seeded(MosaicBertModel, cfg).cuda().to(torch.bfloat16)
    ids = torch.randint(1, VOCAB, (40,), device="cuda")
    cu = torch.tensor([0, 10, 25, 40], dtype=torch.int32, device="cuda")
    with torch.inference_mode():
        model(input_ids=ids, cu_seqlens=cu, max_seqlen=15)  # first call: kernels compile, slopes cached
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(input_ids=ids, cu_seqlens=cu, max_seqlen=15)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_packed_mlm_training_step_never_synchronises_the_gpu():
    """A pretraining step on a packed batch with the collator's ``masked_rows`` (forward under bf16 autocast,
    backward, gradient clipping, fused AdamW) queues all its work without waiting for the GPU, so the host
    runs a step ahead; without them the MLM head's ``nonzero`` reads the row count back (a sync per step)."""
    from mosaic_embed.model.modeling import MosaicBertForMaskedLM
    from tests.helpers import packed_mlm_batch

    cfg = preset_config("mosaic-bert-tiny", hidden_size=64, num_attention_heads=2, intermediate_size=128)
    model = seeded(MosaicBertForMaskedLM, cfg).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    def step(batch):
        batch = {k: (v.pin_memory().cuda(non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    step(packed_mlm_batch([10, 15, 15], 0, vocab=VOCAB, host_rows=True))  # kernels compile, state is made
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step(packed_mlm_batch([12, 9, 19], seed, vocab=VOCAB, host_rows=True)) for seed in (1, 2)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(x) for x in losses)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):  # the device-rows path does wait: the check above can fail
            step(packed_mlm_batch([12, 9, 19], 3, vocab=VOCAB))
    finally:
        torch.cuda.set_sync_debug_mode("default")
