"""Detoxify 'multilingual' (XLM-RoBERTa base): per-caption toxicity score, as the seed's `nsfw-detoxify`.

The seed calls `Detoxify("multilingual").predict(captions)` and takes, per sample, the MAX over every class that
predict returns. predict returns sigmoid(logits[:, i]) for the checkpoint's `config.dataset.args.classes` only: the
v0.4 multilingual model has 16 outputs (7 toxicity classes, then 9 identity classes used only as a training loss)
and predict reports the first 7. So score = max(sigmoid(logits[:, :len(classes)])).

Loading is fully offline and follows detoxify's own `get_model_and_tokenizer` with the hub name replaced by a local
folder: config from `<weights dir>/xlm-roberta-base/config.json` with num_labels = the checkpoint's num_classes,
the model from the checkpoint's state_dict, the tokenizer from the same folder. Detoxify() itself is not used: its
`huggingface_config_path` route still asks the hub for the config, and, even with the checkpoint's model_type
pointed at the folder, builds the model from that config.json, whose stock version (no id2label) gives a 2-output
head that the 16-output state_dict does not fit.
"""

from __future__ import annotations

import itertools
import logging
import pickle
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import transformers

from d2m_core.compute.device import to_device
from d2m_core.compute.weights import ResolvedWeights, WeightsError
from d2m_core.compute.weights_files import DETOXIFY_CHECKPOINT as CHECKPOINT_NAME
from d2m_core.compute.weights_files import DETOXIFY_SHA256_PREFIX as EXPECTED_SHA256_PREFIX
from d2m_core.compute.weights_files import MODEL_FILES, TOKENIZER_DIR
from d2m_core.compute.weights_files import check_tokenizer_dir as _check_tokenizer_dir

log = logging.getLogger(__name__)

MAX_LENGTH = 512  # xlm-roberta-base: 514 positions minus the padding offset

# detoxify's multilingual config (configs/Multilingual_toxic_comment_classification_XLMR.json): 7 classes reported,
# 16 outputs (the 7 plus 9 identity classes).
CLASSES = ["toxicity", "severe_toxicity", "obscene", "identity_attack", "insult", "threat", "sexual_explicit"]
NUM_OUTPUTS = 16
# detoxify standardises these names (load_checkpoint); only names, the scores do not depend on them.
_RENAME = {"toxic": "toxicity", "identity_hate": "identity_attack", "severe_toxic": "severe_toxicity"}


def xlm_roberta_base_config(num_labels: int = NUM_OUTPUTS) -> transformers.XLMRobertaConfig:
    """xlm-roberta-base's architecture (its hub config.json values), for random weights."""
    import transformers  # 1-2 s: imported when a detoxify model is built, not with the model registry

    return transformers.XLMRobertaConfig(
        vocab_size=250002,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        max_position_embeddings=514,
        type_vocab_size=1,
        initializer_range=0.02,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        num_labels=num_labels,
    )


# Common caption words, kept whole by the stand-in tokenizer (the real 250k-piece vocabulary keeps most English
# words whole); anything else is cut into pieces of up to 3 letters.
_WORDS = """a an the of in on at to for with and or by from as is are was were be it this that these those his her
their its my your our new old big small large little red blue green yellow black white gray grey brown pink purple
orange gold silver dark light bright beautiful vintage modern young happy sunny cute man woman men women boy girl
child children baby people person family friends dog dogs cat cats bird horse car cars bus train boat plane bike
house home room kitchen bedroom bathroom table chair bed door window wall floor garden tree trees flower flowers
street road city town village park beach sea ocean lake river mountain mountains sky sun snow rain forest field
water food pizza cake coffee tea fruit wedding party game team day night morning evening summer winter spring
autumn year photo photograph image picture view close up top side front back stock illustration vector design art
drawing painting poster print logo icon pattern background texture set collection style shirt dress shoes hat bag
book map sign model style portrait landscape interior exterior black-and-white free high quality best sale buy
shop online price cheap size one two three four five six seven eight nine ten first second last about after
all also any around before behind between down during each every few how into like many more most near next not
now off only other out outside over some such than then there through under up very way what when where which
while who why will would can could should may make made get take see look use used help find show shown free
love life world time work school business story news video music film movie show art artist hand hands face eye
eyes hair head body leg arm smile dinner lunch breakfast bread wine beer glass cup plate bowl box paper wood wooden
metal stone brick glass plastic leather cotton silk gift card birthday christmas holiday travel trip hotel
restaurant market station airport bridge tower church castle museum building office store shopping ice fire
light lights lamp clock phone computer laptop camera screen sofa desk shelf vase pot plant leaf leaves grass
rock sand island desert hill valley coast harbor port ship sunset sunrise dawn moon star stars space planet
vehicle truck motorcycle bicycle road path sport football soccer ball player kids girls boys lady woman's
colorful cozy rustic elegant handmade quiet busy tiny huge empty minimalist abstract digital natural fresh sweet
hot cold warm cool soft hard long short wide tall full open closed wall clock coffee owl cat dog""".split()


def stand_in_tokenizer() -> transformers.PreTrainedTokenizerBase:
    """An offline XLM-R-style unigram tokenizer (ids < 37k < 250002) for random weights; ~1-2 pieces per word."""
    import transformers

    letters = string.ascii_lowercase
    pieces: dict[str, float] = {}
    for w in _WORDS:
        pieces.setdefault("▁" + w, -5.0)
        pieces.setdefault("▁" + w.capitalize(), -5.0)
    for n in (3, 2):
        for combo in itertools.product(letters, repeat=n):
            s = "".join(combo)
            pieces.setdefault("▁" + s, -10.0)
            pieces.setdefault(s, -10.0)
    for c in string.ascii_letters + string.digits + string.punctuation + "àáâãäåçèéêëìíîïñòóôõöøùúûüýÿōł—–’“”…€£°":
        pieces.setdefault("▁" + c, -12.0)
        pieces.setdefault(c, -12.0)
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces.items(), ("<mask>", 0.0)]
    return transformers.XLMRobertaTokenizer(vocab=vocab, model_max_length=MAX_LENGTH)


def _torch_load(path: Path, trusted: bool) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trusted:
            raise WeightsError(f"nsfw-detoxify: {path} needs full unpickling and is not the release's file "
                               f"(sha256 prefix {EXPECTED_SHA256_PREFIX}): refusing it ({exc})") from exc
        # Release checkpoints may pickle more than tensors and plain containers; resolve_weights verified the
        # release's sha256 prefix.
        log.info("nsfw-detoxify: %s needs full unpickling (weights_only=False)", path)
        return torch.load(path, map_location="cpu", weights_only=False)


def load_detoxify_checkpoint(weights: ResolvedWeights) -> tuple[torch.nn.Module, Any, list[str]]:
    """(model, tokenizer, class names) from a detoxify .ckpt and the local xlm-roberta-base folder; no network."""
    import transformers

    path = weights.path
    folder = path.parent / TOKENIZER_DIR
    _check_tokenizer_dir(folder)
    loaded = _torch_load(path, trusted=weights.record.kind == "official")
    if not isinstance(loaded, dict) or "config" not in loaded or "state_dict" not in loaded:
        raise WeightsError(f"nsfw-detoxify: {path} is not a detoxify checkpoint (needs 'config' and 'state_dict')")
    try:
        arch = loaded["config"]["arch"]["args"]
        classes = [_RENAME.get(c, c) for c in loaded["config"]["dataset"]["args"]["classes"]]
        model_class = getattr(transformers, arch["model_name"])
        tokenizer_class = getattr(transformers, arch["tokenizer_name"])
        num_classes = int(arch["num_classes"])
    except (KeyError, TypeError, AttributeError) as exc:
        raise WeightsError(f"nsfw-detoxify: {path} has no usable config.arch.args / dataset.args.classes: {exc!r}") from exc
    config = model_class.config_class.from_pretrained(str(folder), num_labels=num_classes, local_files_only=True)
    try:
        model, info = model_class.from_pretrained(
            None, config=config, state_dict=loaded["state_dict"], local_files_only=True, output_loading_info=True
        )
    except (RuntimeError, ValueError) as exc:  # e.g. a tensor whose shape does not fit the config
        raise WeightsError(f"nsfw-detoxify: {path} does not fit {folder / 'config.json'}: {exc}") from exc
    if info.get("missing_keys") or info.get("mismatched_keys"):
        raise WeightsError(
            f"nsfw-detoxify: {path} does not fit {arch['model_name']} built from {folder / 'config.json'}: "
            f"missing {sorted(info.get('missing_keys', []))[:5]}, mismatched {list(info.get('mismatched_keys', []))[:5]}"
        )
    if info.get("unexpected_keys"):
        log.warning("nsfw-detoxify: ignoring unexpected checkpoint keys %s", sorted(info["unexpected_keys"])[:5])
    tokenizer = tokenizer_class.from_pretrained(str(folder), local_files_only=True)
    # Old transformers capped xlm-roberta-base at 512 via a built-in table; a folder without model_max_length in
    # tokenizer_config.json would otherwise leave truncation without a limit (and overflow the positions).
    limit = config.max_position_embeddings - 2
    if not tokenizer.model_max_length or tokenizer.model_max_length > limit:
        tokenizer.model_max_length = limit
    return model, tokenizer, classes


class DetoxifyMultilingual:
    """The seed's `nsfw-detoxify`: max over detoxify's class probabilities, one float32 per caption."""

    name = "nsfw-detoxify"
    raw_inputs = ["text"]
    preprocessors = ["identity"]
    dependencies: list[str] = []
    to_device = False
    # transformers checks the attention mask on the host (`padding_mask.all()` to skip it): issued after the rest
    waits_for_device = True
    output_fields = {"score": 0}
    weights_files = MODEL_FILES["nsfw-detoxify"]

    @staticmethod
    def verify(weights: ResolvedWeights) -> None:
        """The check beyond the file and its sha256 prefix: the tokenizer/config folder beside it."""
        _check_tokenizer_dir(weights.path.parent / TOKENIZER_DIR)

    def __init__(self, device: torch.device | int | str, *, dtype: torch.dtype = torch.float32,
                 weights: ResolvedWeights) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.weights = weights
        if weights.is_random:
            import transformers

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = transformers.XLMRobertaForSequenceClassification(xlm_roberta_base_config())
            self.tokenizer = stand_in_tokenizer()
            self.class_names = list(CLASSES)
        else:
            model, self.tokenizer, self.class_names = load_detoxify_checkpoint(weights)
        self.model = model.to(self.device, dtype).eval()

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """detoxify's tokenisation: pad to the batch's longest caption, truncate to the model maximum (512)."""
        return self.tokenizer(list(texts), return_tensors="pt", truncation=True, padding=True)

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> tuple[torch.Tensor]:
        if len(texts) == 0:
            return (torch.zeros(0, dtype=torch.float32),)
        inputs = {k: to_device(v, self.device) for k, v in self.tokenize(texts).items()}
        logits = self.model(**inputs)[0]
        probs = torch.sigmoid(logits[:, : len(self.class_names)].float())
        return (probs.max(dim=1).values,)  # copied back with the other models' outputs, without waiting here
