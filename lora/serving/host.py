"""The model side of lora/serve.py: one base model, many LoRA/DoRA adapters on it, batched generation.

Every method of `AdapterHost` runs on the server's single model thread (lora/serving/batcher.py sees to that), so
loading, unloading and generating never overlap and peft's active-adapter state needs no lock.

How rows are grouped into `generate` calls (peft 0.21.2):
- LoRA adapters and the base share one call: peft's mixed-adapter batches (`adapter_names=[...]`, "__base__" for
  the base) send each row through its own adapter.
- peft refuses `adapter_names` for DoRA adapters ("Cannot pass `adapter_names` when DoRA is enabled"), so each DoRA
  adapter gets a call of its own with that adapter active.
- Rows whose answers end at different tokens (an adapter trained under the chat template, whose end of turn is not
  the EOS, next to a plain one) get separate calls: one call stops every row at the same tokens.
Left padding, the `generate` call and the cut at the first stop token are lora.prompts.generation's, shared with the
evaluation harness; where an answer ends follows the prompt template in the adapter's recipe.json ("plain" for the
base and for adapters without one), as the harness and GRPO decide it.
Prompts are rendered by the rule training and scoring use (lora.prompts.templates.encode_prompt): a prompt text is
the row's context under the adapter's prompt template (a "chat" adapter gets it as the user turn of the chat
template, a "{context}" format string gets it substituted in, "plain" and the base get it as written), and a
conversation (OpenAI-style messages) is rendered with the tokenizer's chat template and its generation prompt
whatever the template, its answer ending at the template's end of turn, as a chat row is trained and scored.
DoRA's row norm ||W0 + s·BA|| depends only on weights, so it is computed once when the adapter loads (peft's
`DoraCaching`, filled by one warm-up forward) and every later forward reuses it instead of recomputing it per token.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

import lora.models.bnb_cpu_fixes  # noqa: F401  (before any model loads)
from lora.adapters.folders import AdapterError, read_adapter_records, read_adapter_weights, refuse_if_normalised
from lora.core.errors import UserError, did_you_mean
from lora.models.quantisation import QuantisationSettings
from lora.prompts.chat import check_conversation
from lora.prompts.generation import generate_batch, padding_token_id, stop_token_ids
from lora.prompts.templates import BUILTIN_TEMPLATES, check_template, encode_prompt, template_for

__all__ = [
    "ADAPTER_NAME_PATTERN",
    "ADAPTER_NAME_RULE",
    "BASE_ROUTE",
    "DEFAULT_MAX_ADAPTERS",
    "MAGNITUDE_KEY",
    "AdapterConflictError",
    "AdapterHost",
    "AdapterLimitError",
    "BadRequestError",
    "GeneratedRow",
    "GenerationRow",
    "ServedAdapter",
    "UnknownModelError",
    "build_host",
]

BASE_ROUTE = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch
MAGNITUDE_KEY = "lora_magnitude_vector"
# peft keeps adapters in ModuleDicts, whose keys cannot contain "."; the name also travels in URLs.
ADAPTER_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
ADAPTER_NAME_RULE = "1-64 letters, digits, '_' or '-' (no '.', no '/')"
# Each adapter stays in memory (a few MB for rank 8 on a small model, far more on a large one) and peft's mixed
# batches grow with the count: a client with POST /v1/adapters must not be able to exhaust the server.
DEFAULT_MAX_ADAPTERS = 16


class UnknownModelError(UserError):
    """A request names a model that is neither the base nor a loaded adapter (HTTP 404)."""


class AdapterConflictError(UserError):
    """An adapter of that name is already loaded (HTTP 409)."""


class AdapterLimitError(UserError):
    """Loading one more adapter would pass the server's --max-adapters (HTTP 409: unload one first)."""


class BadRequestError(UserError):
    """A request the server cannot serve as asked: too long for the context, unloading the base, ... (HTTP 400)."""


@dataclass(frozen=True)
class ServedAdapter:
    """One loaded adapter, as /v1/models describes it.

    Attributes:
        name: the name requests use in their `model` field.
        path: the adapter folder it was loaded from.
        kind: "lora" or "dora".
        trained_on: the base model recorded in the adapter (adapter_config.json / recipe.json), if any.
        created: when it was loaded (Unix seconds).
        notes: warnings found at load time (another base recorded, another quantisation), for the caller.
        prompt_template: the template it was trained under (recipe.json), "plain" when not recorded.
        stop_token_ids: the tokens that end its answers under that template.
    """

    name: str
    path: Path
    kind: str
    trained_on: str | None
    created: int
    notes: tuple[str, ...] = ()
    prompt_template: str = "plain"
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class GenerationRow:
    """One prompt to complete: a request with a list of prompts becomes several rows.

    Attributes:
        stop_token_ids: the tokens its answer ends at when they are not its model's (a conversation sent to a model
            trained on plain prompts ends at the chat template's end of turn); None: its model's.
    """

    model: str
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class GeneratedRow:
    """New tokens for one row (the stop token not included) and why generation ended: "stop" (a stop token) or
    "length"."""

    token_ids: list[int]
    finish_reason: str


class AdapterHost:
    """A base model with adapters loaded onto it in place, generating for mixed batches of requests.

    Args:
        base_name: the name requests use for the bare base (what --base-model said).
        model: the loaded base model (plain transformers, possibly bitsandbytes-quantised), in eval mode.
        tokenizer: its tokenizer; padding is switched to the left for batched generation.
        quant_bits: 4, 8 or None, for the load-time notes only.
        max_adapters: the most adapters loaded at once (each holds its weights in memory, a DoRA adapter also its
            cached norms); None for no limit. A load over it raises `AdapterLimitError`.
    """

    def __init__(self, base_name: str, model, tokenizer, quant_bits: int | None = None,
                 max_adapters: int | None = DEFAULT_MAX_ADAPTERS):
        self.base_name = base_name
        self.base_path = str(getattr(model, "name_or_path", "") or base_name)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.quant_bits = quant_bits
        self.max_adapters = max_adapters
        self.adapters: dict[str, ServedAdapter] = {}
        self.context_length = _context_length(model.config, tokenizer)
        self.generation_config = getattr(model, "generation_config", None)
        # Read once here, for every built-in template: the model thread must not touch the tokenizer while request
        # threads encode with it (a fast tokenizer is a Rust object that raises "Already borrowed" under concurrent
        # use).
        # Only for the templates this tokenizer supports: many base tokenizers have no chat template, and asking for
        # its end of turn raises; a chat-trained adapter is refused on such a base when it loads.
        self.stops_by_template = {template: tuple(stop_token_ids(tokenizer, template, self.generation_config))
                                  for template in BUILTIN_TEMPLATES if _template_problem(template, tokenizer) is None}
        self.stop_token_ids = self.stops_by_template["plain"]  # the base's: its prompts are plain text
        self.pad_token_id = padding_token_id(tokenizer, self.stop_token_ids)
        self.device = model.device
        self.stats = {"generate_calls": 0, "rows": 0}

    # ---- what is served -------------------------------------------------------------------------------------

    def model_names(self) -> list[str]:
        """The base's name followed by the loaded adapters' names, in load order."""
        return [self.base_name, *self.adapters]

    def require_model(self, name: str) -> None:
        """Raise `UnknownModelError` (naming what is served) unless `name` is the base or a loaded adapter."""
        if name != self.base_name and name not in self.adapters:
            known = ", ".join(f'"{known}"' for known in self.model_names())
            raise UnknownModelError(
                f'model "{name}" is not served here{did_you_mean(name, self.model_names())}. Known models: {known}. '
                "Load an adapter with POST /v1/adapters {\"name\": ..., \"path\": ...}."
            )

    # ---- loading and unloading ------------------------------------------------------------------------------

    def load_adapter(self, name: str, path: str | Path) -> ServedAdapter:
        """Attach the adapter folder `path` under `name` to the already-loaded base (no reload of the base).

        Refused (with the base left exactly as it was): a bad or taken name, a folder that is not a peft LoRA/DoRA
        adapter, a DoRA adapter pre-normalised for a runtime or missing any of its magnitude vectors, pickled
        weights, and an adapter whose tensor shapes do not fit this base (one trained on another model).

        Raises:
            BadRequestError, AdapterConflictError, AdapterError: as above (all `UserError`s).
        """
        self._check_new_name(name)
        if self.max_adapters is not None and len(self.adapters) >= self.max_adapters:
            raise AdapterLimitError(
                f"this server already serves {len(self.adapters)} adapters, its limit (--max-adapters "
                f"{self.max_adapters}); unload one first (DELETE /v1/adapters/NAME) or restart the server with a "
                "higher --max-adapters if memory allows."
            )
        folder = Path(path).expanduser().resolve()
        refuse_if_normalised(folder)
        records = read_adapter_records(folder)
        template = (records.recipe or {}).get("prompt_template") or "plain"
        problem = _template_problem(template, self.tokenizer)
        if problem:
            raise AdapterError(f'cannot serve adapter "{name}" from {folder} on {self.base_name}: it was trained with '
                               f"prompt_template {template!r} (its recipe.json), but {problem}.")
        peft_type = records.adapter_config.get("peft_type")
        if peft_type != "LORA":
            raise AdapterError(
                f"{folder} is a {peft_type} adapter; serve.py serves peft LoRA and DoRA adapters (peft_type LORA). "
                "Official NVlabs DoRA checkpoints (peft_type DORA) convert with "
                "`python lora/convert_adapter.py --from nvlabs -i IN -o OUT`."
            )
        weights = read_adapter_weights(folder)
        _check_magnitudes_in_file(folder, records.is_dora, weights)
        self._attach(name, folder)
        try:
            if records.is_dora:
                self._check_magnitudes_loaded(name, folder, weights)
                self._compute_dora_norms_once(name)
        except BaseException:
            self._detach(name)
            raise
        adapter = ServedAdapter(
            name=name,
            path=folder,
            kind="dora" if records.is_dora else "lora",
            trained_on=records.base_model,
            created=int(time.time()),
            notes=tuple(self._base_notes(records)),
            prompt_template=template,
            stop_token_ids=self._stops_for_template(template),
        )
        self.adapters[name] = adapter
        return adapter

    def unload_adapter(self, name: str) -> None:
        """Detach a loaded adapter; the base and the other adapters keep serving unchanged."""
        if name == self.base_name:
            raise BadRequestError(f'"{name}" is the base model; it cannot be unloaded (only adapters can).')
        self.require_model(name)
        self._detach(name)
        del self.adapters[name]

    def _stops_for_template(self, template: str) -> tuple[int, ...]:
        if template in self.stops_by_template:
            return self.stops_by_template[template]
        # A recipe's own "{context}" format string, met only now: one short encode of its end-of-answer text.
        return tuple(stop_token_ids(self.tokenizer, template, self.generation_config))

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not ADAPTER_NAME_PATTERN.fullmatch(name):
            raise BadRequestError(
                f"adapter name {name!r} is not allowed: use {ADAPTER_NAME_RULE}."
            )
        if name == self.base_name or name == BASE_ROUTE:
            raise AdapterConflictError(f'"{name}" is the name of the base model; choose another adapter name.')
        if name in self.adapters:
            raise AdapterConflictError(
                f'an adapter named "{name}" is already loaded (from {self.adapters[name].path}). Unload it first '
                f"(DELETE /v1/adapters/{name}) or choose another name."
            )

    def _attach(self, name: str, folder: Path) -> None:
        from peft import PeftConfig, PeftModel, PeftModelForCausalLM

        try:
            if not isinstance(self.model, PeftModel):
                config = PeftConfig.from_pretrained(str(folder))
                config.inference_mode = True
                # Built explicitly (not via from_pretrained) so that a failed load still leaves us a PeftModel to
                # unload, and so that generate() understands `adapter_names` whatever task_type the file says.
                self.model = PeftModelForCausalLM(self.model, config, adapter_name=name)
            self.model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
        except (RuntimeError, ValueError, KeyError, TypeError, OSError) as error:
            self._detach(name)
            raise AdapterError(
                f'cannot load adapter "{name}" from {folder} onto {self.base_name}: {_summarise_load_error(error)}. '
                "An adapter trained on another base model (other layer shapes or names) cannot be served on this "
                "one; start a server with that base (--base-model) instead."
            ) from None
        self.model.eval()

    def _detach(self, name: str) -> None:
        from peft import PeftModel

        if not isinstance(self.model, PeftModel) or name not in self.model.peft_config:
            return
        if len(self.model.peft_config) == 1:
            # peft cannot hold zero adapters (its forward looks up the deleted one), so go back to the bare base.
            self.model = self.model.unload().eval()
        else:
            self.model.delete_adapter(name)

    def _check_magnitudes_loaded(self, name: str, folder: Path, weights: dict) -> None:
        """Every DoRA layer carries the magnitude vector from the file (not peft's ||W0|| initial value)."""
        checked = 0
        for module_name, module in self.model.named_modules():
            if name not in getattr(module, "lora_A", {}) and name not in getattr(module, "lora_embedding_A", {}):
                continue
            magnitudes = getattr(module, MAGNITUDE_KEY, {})
            stored = weights.get(f"{module_name}.{MAGNITUDE_KEY}", weights.get(f"{module_name}.{MAGNITUDE_KEY}.weight"))
            if name not in magnitudes or stored is None:
                raise AdapterError(f"DoRA adapter {folder}: layer {module_name} has no magnitude vector after loading.")
            loaded = magnitudes[name].weight
            if not torch.equal(loaded.detach().float().cpu(), stored.to(loaded.dtype).float()):
                raise AdapterError(
                    f"DoRA adapter {folder}: the magnitude vector of {module_name} differs from the file after loading."
                )
            checked += 1
        if checked == 0:
            raise AdapterError(f"DoRA adapter {folder} attached to no layer of {self.base_name}.")

    def _compute_dora_norms_once(self, name: str) -> None:
        """One forward with the adapter active fills peft's DoRA cache (B@A and ||W0 + s·BA|| per layer)."""
        from peft.helpers import DoraCaching

        warm_up_ids = torch.tensor([[self.pad_token_id]], device=self.device)  # the norms depend on weights only
        with DoraCaching(), torch.no_grad():
            self.model.set_adapter(name, inference_mode=True)
            self.model(input_ids=warm_up_ids)

    def _base_notes(self, records) -> list[str]:
        notes = []
        trained_on = records.base_model
        if trained_on and trained_on not in (self.base_name, self.base_path) and not _same_folder(
            trained_on, self.base_path
        ):
            notes.append(
                f"recorded base is {trained_on}, served on {self.base_name}: the shapes fit, but the outputs are only "
                "what the adapter learned if both hold the same weights"
            )
        if records.trained_quant_bits != self.quant_bits and records.recipe is not None:
            trained = f"{records.trained_quant_bits}-bit" if records.trained_quant_bits else "unquantised"
            served = f"{self.quant_bits}-bit" if self.quant_bits else "unquantised"
            notes.append(f"trained on a {trained} base, served on a {served} one")
        return notes

    # ---- generation -----------------------------------------------------------------------------------------

    def prompt_template(self, model: str) -> str:
        """The template prompts to `model` are rendered under: the adapter's (recipe.json), "plain" for the base."""
        adapter = self.adapters.get(model)
        return adapter.prompt_template if adapter is not None else "plain"

    def prepare_row(self, model: str, prompt: str | list[dict], max_new_tokens: int, temperature: float = 0.0,
                    top_p: float = 1.0) -> GenerationRow:
        """A `GenerationRow` for `prompt` to `model`, rendered and stopped by the rule training and scoring use.

        Args:
            prompt: a prompt text (the context of a row: rendered under the model's prompt template), or a
                conversation [{"role", "content"}, ...] (rendered with the chat template and its generation prompt).

        Raises:
            UnknownModelError: `model` is not served. BadRequestError: see `encode_prompt`.
        """
        self.require_model(model)
        own_template = self.prompt_template(model)
        template = template_for(prompt, own_template)
        prompt_ids = self.encode_prompt(prompt, max_new_tokens, model=model)
        stops = None if template == own_template else self.stops_by_template[template]
        return GenerationRow(model, prompt_ids, max_new_tokens, temperature, top_p, stop_token_ids=stops)

    def encode_prompt(self, prompt: str | list[dict], max_new_tokens: int, *, model: str | None = None) -> list[int]:
        """Token ids of a prompt to `model` (None: the base); `BadRequestError` when empty, when it cannot be rendered
        (a conversation with an unknown role or non-text content; the chat template on a tokenizer without one) or
        when prompt + completion exceed the context.

        Encoded by the rule training uses (lora.prompts.templates.encode_prompt): the text is the context of a row
        under the model's prompt template, and trailing whitespace is left for the completion, so a prompt ending in
        "Answer: " is continued with the token " positive" the adapter learned, not after a lone " ".
        """
        template = template_for(prompt, self.prompt_template(model) if model is not None else "plain")
        if isinstance(prompt, list):
            try:
                check_conversation(prompt, "the conversation", need_assistant=False)
            except UserError as error:
                raise BadRequestError(str(error)) from None
        problem = _template_problem(template, self.tokenizer)
        if problem:
            what = "a conversation (messages)" if isinstance(prompt, list) else f'a prompt to "{model}"'
            raise BadRequestError(f"cannot render {what} under prompt_template {template!r}: {problem}.")
        prompt_ids = encode_prompt(prompt, template, self.tokenizer)
        if not prompt_ids:
            raise BadRequestError("the prompt is empty (it encodes to no tokens); send at least one character.")
        requested = len(prompt_ids) + max_new_tokens
        if self.context_length is not None and requested > self.context_length:
            raise BadRequestError(
                f"this model's maximum context length is {self.context_length} tokens, but {requested} were "
                f"requested ({len(prompt_ids)} in the prompt, {max_new_tokens} for the completion). Shorten the "
                "prompt or lower max_tokens."
            )
        return prompt_ids

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def run_batch(self, rows: list[GenerationRow]) -> list[GeneratedRow | Exception]:
        """Generate for every row with as few `generate` calls as peft allows.

        Returns:
            One entry per row, in order: its `GeneratedRow`, or the exception that row got: a `UserError` (its
            adapter was unloaded while it waited) or whatever its `generate` call raised. A failure in one call
            never affects rows of another.
        """
        results: list[GeneratedRow | Exception | None] = [None] * len(rows)
        for index, row in enumerate(rows):
            try:
                self.require_model(row.model)
            except UserError as error:
                results[index] = error
        pending = [index for index, result in enumerate(results) if result is None]
        for (route, _, _, stop_ids), indices in self._plan_generate_calls(rows, pending).items():
            try:
                generated = self._generate(route, [rows[i] for i in indices], stop_ids)
            except Exception as error:  # e.g. out of memory: fail these rows, serve the others
                generated = [error] * len(indices)
            for index, result in zip(indices, generated):
                results[index] = result
        return results

    def _plan_generate_calls(self, rows: list[GenerationRow], pending: list[int]) -> dict[tuple, list[int]]:
        """Row indices per `generate` call, keyed by (route, temperature, top_p, stop token ids).

        route: None for the shared LoRA-and-base call, or the name of the one DoRA adapter the call runs.
        """
        calls: dict[tuple, list[int]] = defaultdict(list)
        for index in pending:
            row = rows[index]
            adapter = self.adapters.get(row.model)
            route = adapter.name if adapter is not None and adapter.kind == "dora" else None
            top_p = row.top_p if row.temperature > 0 else 1.0  # greedy rows ignore top_p: batch them all together
            stop_ids = adapter.stop_token_ids if adapter is not None else self.stop_token_ids
            if row.stop_token_ids is not None:
                stop_ids = row.stop_token_ids
            calls[(route, row.temperature, top_p, stop_ids)].append(index)
        return calls

    def _generate(self, dora_route: str | None, rows: list[GenerationRow],
                  stop_ids: tuple[int, ...]) -> list[GeneratedRow]:
        from peft.helpers import DoraCaching

        routes = [BASE_ROUTE if row.model == self.base_name else row.model for row in rows]
        self.stats["generate_calls"] += 1
        self.stats["rows"] += len(rows)
        adapter_context, extra = nullcontext(), {}
        if dora_route is not None:
            self.model.set_adapter(dora_route, inference_mode=True)
        elif set(routes) == {BASE_ROUTE}:
            adapter_context = self.model.disable_adapter() if self.adapters else nullcontext()
        elif len(set(routes)) == 1:
            # One adapter only: the plain forward, the same computation as a single-adapter peft model.
            self.model.set_adapter(routes[0], inference_mode=True)
        else:
            extra = {"adapter_names": routes}
        with DoraCaching(), adapter_context:
            continuations = generate_batch(
                self.model, [row.prompt_ids for row in rows], max_new_tokens=[row.max_new_tokens for row in rows],
                pad_id=self.pad_token_id, stop_ids=stop_ids, temperature=rows[0].temperature, top_p=rows[0].top_p,
                **extra,
            )
        return [GeneratedRow(c.token_ids, "stop" if c.stopped else "length") for c in continuations]


def _check_magnitudes_in_file(folder: Path, is_dora: bool, weights: dict) -> None:
    """A DoRA file holds a magnitude vector for every adapted layer; a LoRA file holds none (it would be ignored)."""
    adapted = {key.split(".lora_A.")[0] for key in weights if ".lora_A." in key}
    adapted |= {key.split(".lora_embedding_A")[0] for key in weights if ".lora_embedding_A" in key}
    with_magnitude = {key.split(f".{MAGNITUDE_KEY}")[0] for key in weights if f".{MAGNITUDE_KEY}" in key}
    if is_dora:
        missing = sorted(adapted - with_magnitude)
        if missing or not adapted:
            raise AdapterError(
                f"{folder} is a DoRA adapter (use_dora: true) but {len(missing)} of its {len(adapted)} adapted layers "
                f"have no {MAGNITUDE_KEY} (first: {missing[0] if missing else 'no layers at all'}). Without its "
                "magnitudes a DoRA adapter computes wrong outputs, so it is refused; re-save it from the training run."
            )
    elif with_magnitude:
        raise AdapterError(
            f"{folder} holds DoRA magnitude vectors but its adapter_config.json says use_dora: false, so peft would "
            "apply it as plain LoRA and drop the magnitudes. Set use_dora: true if it is a DoRA adapter."
        )


def _template_problem(template: str, tokenizer) -> str | None:
    """Why answers under `template` cannot be served with this tokenizer (e.g. "chat" without a chat template)."""
    try:
        check_template(template, tokenizer)
    except UserError as error:
        return str(error).rstrip(".")
    return None


def _context_length(config, tokenizer) -> int | None:
    for value in (getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)):
        if isinstance(value, int) and 0 < value < 10_000_000:
            return value
    return None


def _same_folder(a: str, b: str) -> bool:
    first, second = Path(a).expanduser(), Path(b).expanduser()
    return first.is_dir() and second.is_dir() and first.resolve() == second.resolve()


def _summarise_load_error(error: BaseException) -> str:
    """peft's message cut to its first problem (a size-mismatch error lists every layer), with a count of the rest."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    mismatches = sum("size mismatch" in line for line in lines)
    text = " ".join(lines[:2]).rstrip(". ")
    if mismatches > 1:
        text += f" (and {mismatches - 1} more size mismatches)"
    return re.sub(r"\s+", " ", text)


def build_host(base_model: str, *, quantisation: QuantisationSettings, base_path: str | None = None,
               max_adapters: int | None = DEFAULT_MAX_ADAPTERS) -> AdapterHost:
    """Load a base model and its tokenizer into an `AdapterHost` with no adapters yet.

    Args:
        base_model: hub id or folder; requests name the base by this string.
        quantisation: how to load the base (lora.serving.app.served_quantisation: as the adapters were trained).
        base_path: where to load it from when already resolved; else `resolve_model_source(base_model)`.
        max_adapters: the most adapters served at once (None: no limit).
    """
    from lora.adapters.inference import load_inference_base
    from lora.models.source import resolve_model_source

    path = base_path or resolve_model_source(base_model).path
    model, tokenizer = load_inference_base(base_model, path, quantisation)
    return AdapterHost(base_model, model, tokenizer, quant_bits=quantisation.bits, max_adapters=max_adapters)
