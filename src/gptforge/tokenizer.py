"""One tokenizer interface (`encode`, `decode`, `eos_id`, `vocab_size`, chat) over HF `tokenizers`.

Any `tokenizer.json` loads: byte-level BPE (GPT-2, Qwen, Llama 3, ours) and SentencePiece conversions (Llama 2,
Mistral, Gemma: a normalizer, the Metaspace pre-tokenizer, byte fallback); `tokenizers` does the encoding. What
the file does not say comes from its siblings, read as transformers reads them: `tokenizer_config.json` (eos, bos,
pad, the chat template), `special_tokens_map.json`, `chat_template.jinja` and `generation_config.json` (the ids
that end generation, possibly several). Whether a sequence starts with BOS is what the file's post-processor adds
(transformers 5 reads it the same way); `add_bos_token` in the config decides only where there is none.

Tokenizers we train are byte-level BPE with `<|endoftext|>` (the document separator) and a few more special
tokens reserved for chat templates, so that fine-tuning never has to resize the vocabulary for them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from gptforge.errors import GptforgeError, not_one_string

EOS = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Ids 0..7 of a trained tokenizer: EOS, two chat-turn markers (ChatML style) and five held in reserve.
SPECIAL_TOKENS = [EOS, IM_START, IM_END] + [f"<|reserved_{i}|>" for i in range(3, 8)]
CHAT_ROLES = ("system", "user", "assistant", "tool")
TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# generation_config.json's extra end ids, kept in the checkpoint's tokenizer_config.json (as token strings)
STOP_TOKENS_KEY = "gptforge_stop_tokens"
# The named special tokens a template sees as variables (transformers' SPECIAL_TOKENS_ATTRIBUTES)
NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# encode_chat's layout as a Jinja template, for transformers' apply_chat_template
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '" + IM_START + "' + message['role'] + '\\n' + message['content'] + '"
    + IM_END + "' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '" + IM_START + "assistant\\n' }}{% endif %}"
)


def _ours() -> dict[str, Any]:
    """tokenizer_config.json of a tokenizer we trained (or GPT-2's files): EOS doubles as BOS and UNK."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": EOS, "unk_token": EOS,
            "model_max_length": None, "clean_up_tokenization_spaces": False, "add_prefix_space": False}


def _content(token: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken object with "content"."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GptforgeError(f"{path}: not valid JSON ({e}); fix or remove the file") from None
    if not isinstance(data, dict):
        raise GptforgeError(f"{path}: expected a JSON object, got {type(data).__name__}; fix or remove the file")
    return data


def _hf_settings(folder: Path, hf: HFTokenizer) -> tuple[dict[str, Any] | None, list[int]]:
    """The tokenizer_config of a tokenizer.json's folder (special_tokens_map and chat_template.jinja merged in),
    and generation_config's end ids. None of the files: None (a bare tokenizer.json)."""
    cfg_file, map_file, gen_file = (folder / f for f in (HF_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, GENERATION_CONFIG_FILE))
    if not (cfg_file.is_file() or map_file.is_file() or gen_file.is_file()):
        return None, []
    config = _read_json(cfg_file) if cfg_file.is_file() else {}
    for key, value in (_read_json(map_file) if map_file.is_file() else {}).items():
        config.setdefault(key, value)
    if (folder / CHAT_TEMPLATE_FILE).is_file():  # transformers: the .jinja file wins over the config's entry
        config["chat_template"] = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    stops: list[int] = []
    # The model's generation_config.json, then its config.json, name eos/bos ids the tokenizer config may omit.
    for i, f in enumerate((gen_file, folder / "config.json")):
        if i == 1 and _content(config.get("eos_token")) is not None:
            break  # config.json only fills a gap
        ids = _read_json(f) if f.is_file() else {}
        if i == 0:
            eos = ids.get("eos_token_id")
            stops = [j for j in (eos if isinstance(eos, list) else [eos]) if isinstance(j, int) and hf.id_to_token(j)]
        for name, key in (("eos_token", "eos_token_id"), ("bos_token", "bos_token_id")):
            first = ids.get(key)
            first = first[0] if isinstance(first, list) and first else first
            if _content(config.get(name)) is None and isinstance(first, int) and hf.id_to_token(first) is not None:
                config[name] = hf.id_to_token(first)
    if _content(config.get("eos_token")) is None and hf.token_to_id(EOS) is not None:
        config["eos_token"] = EOS  # GPT-2's tokenizer class takes it by default; its folders often leave it out
    return config, stops


class Tokenizer:
    """A tokenizer and its settings; build one with `train`, `load` or `from_gpt2_files`.

    `config` is the content of tokenizer_config.json (None: a bare tokenizer.json, as we train them, whose
    settings are ours when it has <|endoftext|>); `stop_ids` are further ids that end generation
    (generation_config.json's eos_token_id list)."""

    def __init__(self, hf: HFTokenizer, config: dict[str, Any] | None = None, *, stop_ids: Iterable[int] = ()):
        self.hf = hf
        if config is None:
            config = _ours() if hf.token_to_id(EOS) is not None else {}
        self.config = dict(config)
        eos = _content(self.config.get("eos_token"))
        if eos is None:
            raise GptforgeError("the tokenizer names no end-of-sequence token; set \"eos_token\" in the "
                                "tokenizer_config.json beside tokenizer.json (e.g. \"</s>\" or \"<|endoftext|>\")")
        self.eos_id: int = hf.token_to_id(eos) if hf.token_to_id(eos) is not None else -1
        if self.eos_id < 0:
            raise GptforgeError(f"tokenizer_config.json's eos_token {eos!r} is not in tokenizer.json's vocabulary; "
                                "fix the config (or use the tokenizer.json it was written for)")
        extra = self.config.get(STOP_TOKENS_KEY)
        extra = [hf.token_to_id(t) for t in extra if isinstance(t, str)] if isinstance(extra, list) else []
        extra = [i for i in extra if i is not None]
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys([self.eos_id, *stop_ids, *extra]))
        # A bos or pad token the vocabulary lacks is left unused (transformers would add it as a new token).
        self.bos_id: int | None = hf.token_to_id(_content(self.config.get("bos_token")) or "")
        pad = hf.token_to_id(_content(self.config.get("pad_token")) or "")
        self.pad_id: int = pad if pad is not None else self.eos_id
        self.start_ids: tuple[int, ...] = self._start_ids()

    def _start_ids(self) -> tuple[int, ...]:
        """The ids a sequence starts with: what the post-processor puts before the text (BOS for Llama, Gemma,
        Mistral), or, with no post-processor, BOS when the config's add_bos_token asks for it."""
        if self.hf.post_processor is None:
            return (self.bos_id,) if self.config.get("add_bos_token") and self.bos_id is not None else ()
        bare = self.hf.encode("a", add_special_tokens=False).ids
        full = self.hf.encode("a", add_special_tokens=True).ids
        at = next((k for k in range(len(full) - len(bare) + 1) if full[k:k + len(bare)] == bare), 0)
        return tuple(full[:at])

    # --- construction -----------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> Tokenizer:
        """Train a byte-level BPE of `vocab_size` tokens (special tokens included) on an iterator of texts."""
        floor = 256 + len(SPECIAL_TOKENS)
        if vocab_size < floor:
            raise GptforgeError(f"vocab size {vocab_size} is too small: byte-level BPE needs at least {floor} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the corpus or not
            show_progress=False,
        )
        hf.train_from_iterator(not_one_string(texts, "Tokenizer.train's texts"), trainer=trainer)
        return cls(hf)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a `tokenizer.json`, or a folder holding one (or GPT-2's `vocab.json` + `merges.txt`), with the
        settings of the HF files beside it (tokenizer_config.json, special_tokens_map.json, chat_template.jinja,
        generation_config.json)."""
        p = Path(path)
        if p.is_dir():
            if (p / TOKENIZER_FILE).is_file():
                p = p / TOKENIZER_FILE
            elif (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
                return cls.from_gpt2_files(p / "vocab.json", p / "merges.txt")
            elif (p / "tokenizer.model").is_file():
                raise GptforgeError(f"{p} holds a SentencePiece tokenizer.model but no {TOKENIZER_FILE}; convert it "
                                    "once with transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")
            else:
                raise GptforgeError(f"{p} holds neither {TOKENIZER_FILE} nor vocab.json + merges.txt")
        if not p.is_file():
            raise GptforgeError(f"tokenizer not found: {p} (give a tokenizer.json or a folder with vocab.json + merges.txt)")
        try:
            hf = HFTokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            reason = " ".join(str(e).split())[:200]
            raise GptforgeError(f"{p}: not a valid tokenizer.json ({reason}); use the file as the model's "
                                "repository ships it, or one written by tokenizers' Tokenizer.save") from None
        config, stops = _hf_settings(p.parent, hf)
        return cls(hf, config, stop_ids=stops)

    @classmethod
    def from_gpt2_files(cls, vocab: str | Path, merges: str | Path) -> Tokenizer:
        """GPT-2's own BPE from its `vocab.json` and `merges.txt` (offline: the files must be local)."""
        for f in (vocab, merges):
            if not Path(f).is_file():
                raise GptforgeError(f"GPT-2 tokenizer file not found: {f}")
        try:
            hf = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
        except Exception as e:
            raise GptforgeError(f"cannot read GPT-2 BPE files {vocab}, {merges}: {e}") from None
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([EOS])  # already id 50256 in GPT-2's vocab: marks it special, adds nothing
        return cls(hf)

    def save(self, path: str | Path) -> Path:
        """Write `tokenizer.json` (to `path`, or into it when it is a folder) and its settings beside it
        (tokenizer_config.json); returns the tokenizer.json written."""
        p = Path(path)
        if p.is_dir():
            p = p / TOKENIZER_FILE
        self.hf.save(str(p))
        (p.parent / HF_CONFIG_FILE).write_text(json.dumps(self.hf_config(), indent=2) + "\n")
        return p

    def hf_config(self, model_max_length: int | None = None) -> dict:
        """The content of `tokenizer_config.json`: the settings this tokenizer was loaded with (its chat template,
        special tokens, extra end tokens), so that transformers' AutoTokenizer loads the folder offline
        (export-hf's folders; every checkpoint, which lm-evaluation-harness reads this way) and `load` reads
        them back."""
        cfg = {k: v for k, v in self.config.items() if k not in ("auto_map", STOP_TOKENS_KEY)}
        if model_max_length is not None:
            cfg["model_max_length"] = model_max_length
        elif cfg.get("model_max_length") is None:
            cfg.pop("model_max_length", None)
        if self.chat_template is not None and "chat_template" not in cfg:
            cfg["chat_template"] = self.chat_template
        extra = [self.hf.id_to_token(i) for i in self.eos_ids[1:]]
        if extra:
            cfg[STOP_TOKENS_KEY] = extra
        return cfg

    # --- the interface ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """The true number of token ids, special tokens included (the model pads its table above this)."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, start: bool = False) -> list[int]:
        """The ids of `text`, no special tokens added; `start=True`: `text` begins a sequence, so it gets the
        tokenizer's `start_ids` (BOS, for the tokenizers that put one there) first."""
        if not isinstance(text, str):
            raise GptforgeError(f"Tokenizer.encode takes one string, got a {type(text).__name__}; "
                                "for a list of texts use encode_batch")
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return [*self.start_ids, *ids] if start else ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once; HF tokenizers spreads the batch over all cores."""
        texts = list(not_one_string(texts, "Tokenizer.encode_batch's texts"))
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        if isinstance(ids, (str, bytes)):
            raise GptforgeError("Tokenizer.decode takes token ids (a list of ints), got a string")
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def stream_decoder(self) -> StreamDecoder:
        """An incremental decoder for ids that arrive one at a time (see StreamDecoder)."""
        return StreamDecoder(self)

    def decode_stream(self, ids: Iterable[int]) -> Iterator[str]:
        """Yield text as ids arrive, holding back bytes until they complete a UTF-8 character."""
        if isinstance(ids, (str, bytes)):
            raise GptforgeError("Tokenizer.decode_stream takes token ids (ints), got a string")
        stream = self.stream_decoder()
        for i in ids:
            if text := stream.step(i):
                yield text
        if text := stream.flush():
            yield text

    # --- chat template ----------------------------------------------------------------------------------
    # The template is tokenizer_config.json's "chat_template" (one string, or named ones: "default", "tool_use").
    # A tokenizer without one has ChatML exactly when both ChatML markers are special tokens of its vocabulary:
    # trained tokenizers always do; an imported GPT-2 tokenizer gains them through `add_chat_tokens` (and its
    # model through an embedding resize).
    @property
    def chat_template(self) -> str | None:
        """The default chat template (Jinja), or None."""
        named = self._templates()
        if named:
            return named.get("default") or next(iter(named.values()))
        return CHATML_TEMPLATE if all(self._special_id(t) is not None for t in (IM_START, IM_END)) else None

    def _templates(self) -> dict[str, str]:
        raw = self.config.get("chat_template")
        if isinstance(raw, str):
            return {"default": raw}
        if isinstance(raw, list):  # [{"name": ..., "template": ...}], as tokenizer_config.json stores several
            return {t["name"]: t["template"] for t in raw if isinstance(t, dict) and isinstance(t.get("template"), str)}
        return dict(raw) if isinstance(raw, dict) else {}

    def _template_for(self, tools: list | None) -> str:
        self._require_chat()
        named = self._templates()
        if tools is not None and "tool_use" in named:
            return named["tool_use"]
        return self.chat_template

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def _special_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token) if token in self._specials else None

    @property
    def _specials(self) -> set[str]:
        return {t.content for t in self.hf.get_added_tokens_decoder().values() if t.special}

    @property
    def im_end_id(self) -> int:
        """The id that ends a chat turn (<|im_end|>, <|eot_id|>, <end_of_turn>, ...): generation for a chat
        stops there."""
        self._require_chat()
        return self._turn_end_id if self._turn_end_id is not None else self.eos_id

    @property
    def chat_stop_ids(self) -> tuple[int, ...]:
        """The ids that end an assistant turn: the template's end-of-turn token and every end-of-sequence id."""
        return tuple(dict.fromkeys([self.im_end_id, *self.eos_ids]))

    @cached_property
    def _turn_end_id(self) -> int | None:
        """The special token that closes an assistant turn in this template, found by rendering one."""
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        try:
            ids, mask = self.encode_chat(probe)
        except GptforgeError:
            return None
        specials = {self.hf.token_to_id(t) for t in self._specials}
        learned = [i for i, m in zip(ids, mask) if m and i in specials]
        return learned[-1] if learned else None

    def add_chat_tokens(self) -> int:
        """Add the ChatML markers as special tokens where missing; returns how many ids were added."""
        before = self.vocab_size
        self.hf.add_special_tokens([t for t in (IM_START, IM_END) if self._special_id(t) is None])
        self.__dict__.pop("_turn_end_id", None)
        self.__dict__.pop("_plain", None)
        return self.vocab_size - before

    def _require_chat(self) -> None:
        if not self.has_chat_template:
            raise GptforgeError(f"this tokenizer has no chat template (no \"chat_template\" in tokenizer_config.json, "
                                f"no {IM_START}/{IM_END} special tokens); fine-tune it for chat first: "
                                "gptforge finetune --task chat adds them")

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool = False, tools: list | None = None,
                    documents: list | None = None, **variables) -> str:
        """The conversation as the model's template writes it: transformers' apply_chat_template(tokenize=False),
        special tokens (bos_token, eos_token, ...) given to the template as variables; `variables` add more
        (template options such as enable_thinking)."""
        return self._render(messages, add_generation_prompt, tools, documents, variables)[0]

    def _render(self, messages, add_generation_prompt, tools, documents, variables, spans=False):
        template = self._template_for(tools)
        _check_messages(messages)
        named = {k: _content(self.config.get(k)) for k in NAMED_SPECIALS}
        variables = {**{k: v for k, v in named.items() if v is not None}, **variables}
        from gptforge import chat_template  # here: jinja2 (~2 MB resident) only for a tokenizer that renders chats

        fn = chat_template.render_spans if spans else chat_template.render
        out = fn(template, messages, add_generation_prompt=add_generation_prompt, tools=tools, documents=documents,
                 **variables)
        return out if spans else (out, [])

    def encode_chat(self, messages: list[dict], *, add_generation_prompt: bool = False, tools: list | None = None,
                    documents: list | None = None, **variables) -> tuple[list[int], list[bool]]:
        """Token ids of a conversation in the model's chat template (transformers' apply_chat_template with
        tokenize=True), and for each id whether it is assistant-written.

        The assistant mask covers an assistant message's text and the special token that closes its turn (so that
        a model trained on it learns to stop), never the role header nor what follows the closing token. The spans
        come from the template's `{% generation %}` blocks when it has them, else from rendering the conversation
        up to each assistant turn with and without it: the turn is where those renders part from the whole."""
        text, spans = self._assistant_spans(messages, add_generation_prompt, tools, documents, variables)
        enc = self._plain.encode(text, add_special_tokens=False)
        mask = [any(_overlaps(a, b, s, e) for s, e in spans) for a, b in enc.offsets]
        return enc.ids, mask

    def encode_chat_ids(self, messages: list[dict], *, add_generation_prompt: bool = False, tools: list | None = None,
                        documents: list | None = None, **variables) -> list[int]:
        """encode_chat's ids alone, without finding the assistant spans (a prompt needs no mask): one render."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                documents=documents, **variables)
        return self.hf.encode(text, add_special_tokens=False).ids

    def _assistant_spans(self, messages, add_generation_prompt, tools, documents, variables):
        from gptforge import chat_template

        if chat_template.has_generation_blocks(self._template_for(tools)):
            return self._render(messages, add_generation_prompt, tools, documents, variables, spans=True)
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                documents=documents, **variables)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            try:
                before = self.render_chat(messages[:i], add_generation_prompt=True, tools=tools, documents=documents,
                                          **variables)
            except GptforgeError:  # a template may refuse an empty conversation (before a leading assistant turn)
                before = ""
            upto = self.render_chat(messages[:i + 1], tools=tools, documents=documents, **variables)
            start, end = _common_prefix(before, text), _common_prefix(upto, text)
            if end < len(upto):  # the template writes this turn otherwise once later turns follow (Qwen3 drops
                content = m.get("content")  # old reasoning): read it from the whole text, up to its content's end
                if not (isinstance(content, str) and content.strip() and content.strip() in text[start:]):
                    raise GptforgeError(f"message {i}: the chat template writes this assistant turn differently once "
                                        "later turns follow, so its tokens cannot be found; mark the assistant text "
                                        "with {% generation %} ... {% endgeneration %} in the template")
                end = len(text)
            close = self._turn_close(text[start:end], m.get("content"))
            if close > 0:
                spans.append((start, start + close))
        return text, spans

    def _turn_close(self, turn: str, content: Any) -> int:
        """Where an assistant turn's text ends: after the special token that closes it (the first after its
        content; with no content found, as for a tool call, the last). What follows that token (a newline, an
        EOS the template adds at the very end) belongs to the layout, not to the turn."""
        at = turn.find(content.strip()) if isinstance(content, str) and content.strip() else -1
        found = [(turn.find(t, at + len(content.strip())), t) if at >= 0 else (turn.rfind(t), t)
                 for t in self._specials]
        found = [(i, t) for i, t in found if i >= 0]
        if not found:
            return len(turn)
        i, t = min(found) if at >= 0 else max(found)
        return i + len(t)

    @cached_property
    def _plain(self) -> HFTokenizer:
        """This tokenizer without its post-processor: the same ids without special tokens, with untrimmed offsets
        (ByteLevel's post-processor trims the spaces off them), which assistant spans are matched against."""
        if self.hf.post_processor is None:
            return self.hf
        plain = HFTokenizer.from_str(self.hf.to_str())
        plain.post_processor = None
        return plain

    @property
    def fingerprint(self) -> str:
        """A short hash of the vocabulary, merges and special tokens: equal fingerprints encode identically."""
        canonical = json.dumps(json.loads(self.hf.to_str()), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _check_messages(messages: Any) -> None:
    """Each message a {"role", "content"} object; an assistant message with tool_calls may omit its content."""
    if not isinstance(messages, list) or not messages:
        raise GptforgeError("messages must be a non-empty list of {\"role\", \"content\"} objects")
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not (
                isinstance(content, (str, list)) or (content is None and m.get("tool_calls"))):
            raise GptforgeError(f"message {i}: needs a string \"role\" and a string \"content\"")
        if m["role"] not in CHAT_ROLES:
            raise GptforgeError(f"message {i}: unknown role {m['role']!r}; use one of {', '.join(CHAT_ROLES)}")


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # binary search for the first difference: a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid)
    return lo


def _overlaps(a: int, b: int, s: int, e: int) -> bool:
    """Whether a token at characters [a, b) is inside the span [s, e): it overlaps it, or, holding no
    characters (a prepended ▁), stands inside it."""
    return (b > s and a < e) if b > a else s <= a < e


class StreamDecoder:
    """Text of ids that arrive one at a time, complete UTF-8 characters only.

    Each step decodes a short window, the previous complete token(s) and the new ones, and hands out what the
    window adds to its own start: decoders that treat the first token specially (SentencePiece's Metaspace drops
    its leading space) decode a piece correctly only after its left neighbour. A window ending inside a multi-byte
    character (byte-level BPE, byte fallback) decodes to U+FFFD and waits for the next id."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start: the tokens that give the next piece its context
        self.read = 0  # tokens before this are handed out

    def step(self, i: int) -> str:
        """Take one id; return the text that it completes ("" while a character is still incomplete)."""
        self.ids.append(i)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        if text.endswith("\ufffd") or not text.startswith(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]

    def flush(self) -> str:
        """The rest, once no more ids come: incomplete bytes decode to U+FFFD (as decode of the whole would)."""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[_common_prefix(before, text):]  # `before` was handed out already
