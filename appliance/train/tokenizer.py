"""`appliance train tokenizer`: a byte-level BPE trained on a vault dataset version.

Reads the version's train split straight from the vault (in memory), trains with `tokenizers`, and saves
the standard transformers layout (tokenizer.json, tokenizer_config.json with the chat template) under
`artifacts/tokenizers/NAME@K`. The files hold derived vocabulary only; no record text is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from appliance import sealed
from appliance.errors import UsageError

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START, IM_END]
# ChatML: each turn is <|im_start|>role\ncontent<|im_end|>\n; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + 1  # every byte, the special tokens, at least one merge


@dataclass
class TokenizerResult:
    id: str
    path: str
    vocab_size: int
    dataset: str
    records: int
    chars: int
    datasets: list[str]
    """Every version trained on; `dataset` joins them with commas (it named one version before)."""

    def to_json(self) -> dict:
        return dict(self.__dict__)


def train_tokenizer(vault, dataset: str | list[str] | tuple[str, ...], vocab_size: int = 32000,
                    name: str | None = None, min_frequency: int = 2) -> TokenizerResult:
    """Train on the train split of `dataset` (one version or several); each is a parent in lineage."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # ~0.1 s
    from transformers import PreTrainedTokenizerFast  # ~1 s; only this command pays it

    from appliance.refs import dataset as dataset_version
    from appliance.vault import lineage
    from appliance.vault.ingest import validate_name
    from appliance.vault.versions import iter_records

    if vocab_size < MIN_VOCAB:
        raise UsageError(f"--vocab {vocab_size} is too small", f"use at least {MIN_VOCAB}")
    refs: list[str] = []
    for one in [dataset] if isinstance(dataset, str) else list(dataset):
        version = dataset_version(vault.con, one)
        if version not in refs:
            refs.append(version)
    if not refs:
        raise UsageError("no dataset to train the tokenizer on", "give --dataset NAME@N (repeatable)")
    ref = ",".join(refs)
    name = name or f"{refs[0].split('@')[0]}-bpe"
    validate_name(name, "tokenizer")
    stats = {"records": 0, "chars": 0}

    def texts():
        for one in refs:
            for rec in iter_records(vault.con, one, split="train"):
                stats["records"] += 1
                stats["chars"] += len(rec["text"])
                yield rec["text"]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts(), trainer)
    if stats["records"] == 0:
        raise UsageError(f"{ref} has no training records", "ingest more data or lower --validation")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=[IM_START, IM_END], chat_template=CHAT_TEMPLATE,
                                   model_max_length=1 << 20)
    node_id = lineage.next_id(vault.con, name)
    final = vault.home.artifacts / "tokenizers" / node_id
    with sealed.building(final, sealed.TOKENIZER_FILES + ("appliance.json",)) as d:  # in memory, then sealed
        fast.save_pretrained(str(d.path))
        (d.path / "appliance.json").write_text(json.dumps(
            {"id": node_id, "dataset": ref, "datasets": refs, "vocab_size": fast.vocab_size,
             "min_frequency": min_frequency,
             "special_tokens": SPECIAL_TOKENS}, indent=2))
    res = TokenizerResult(node_id, str(final), len(fast), ref, stats["records"], stats["chars"], refs)
    with vault.transaction():
        lineage.add_node(vault.con, node_id, "tokenizer", [(r, "data") for r in refs],
                         attrs={"vocab_size": res.vocab_size, "path": str(final), "records": res.records})
        vault.audit("train.tokenizer", [node_id, *refs], {"vocab_size": res.vocab_size, "records": res.records})
    return res
