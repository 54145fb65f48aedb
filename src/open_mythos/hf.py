"""Hugging Face transformers integration (optional extra ``[hf]``).

``import open_mythos.hf`` registers ``OpenMythosConfig`` / ``OpenMythosForCausalLM`` with
``AutoConfig`` / ``AutoModelForCausalLM``, so any ``OpenMythos.save_pretrained`` directory loads
with ``AutoModelForCausalLM.from_pretrained(dir)``. Without the import, ``trust_remote_code=True``
does the same through the two small shim files that ``save_pretrained`` writes next to the weights.
``model.generate(ids, n_loops=4, ...)`` runs transformers' generation with a per-call loop count.

The wrapper holds the OpenMythos modules under ``model.``; checkpoints without that prefix (ours)
load through ``base_model_prefix``. Generation re-runs the full sequence each step (no
transformers KV cache): correct for any loop count, slower than ``open_mythos.inference.Engine``.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

# absolute imports: transformers' remote-code loader follows relative ones file by file
from open_mythos.config import MythosConfig
from open_mythos.hub import migrate_config
from open_mythos.loss import lm_loss
from open_mythos.model import OpenMythos
from open_mythos.moe import MoE

MODEL_TYPE = "open_mythos"
_FIELDS = [f.name for f in dataclasses.fields(MythosConfig)]


class OpenMythosConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, **kwargs):
        defaults = MythosConfig()
        for name in _FIELDS:
            setattr(self, name, kwargs.pop(name, getattr(defaults, name)))
        kwargs["use_cache"] = False  # no transformers KV cache: each step re-runs the sequence
        super().__init__(**kwargs)
        self.num_hidden_layers = self.prelude_layers + 1 + self.coda_layers

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "OpenMythosConfig":
        """From a config.json: checked and migrated like OpenMythos.from_pretrained's (hub.migrate_config),
        so a missing field is an error, never a silent default."""
        return super().from_dict(migrate_config(config_dict), **kwargs)

    def to_mythos(self) -> MythosConfig:
        return MythosConfig(**{name: getattr(self, name) for name in _FIELDS})


class OpenMythosForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = OpenMythosConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}  # applied when tie_word_embeddings

    def __init__(self, config: OpenMythosConfig):
        super().__init__(config)
        self.model = OpenMythos(config.to_mythos())
        self.post_init()

    def _init_weights(self, module):
        """OpenMythos initialises its parameters and loading overwrites them; transformers gives the
        non-persistent buffers uninitialised memory, so the MoE's load counter starts at zero here."""
        if isinstance(module, MoE):
            module.expert_load.zero_()

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return self.model.head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, n_loops: int | None = None, **kwargs) -> CausalLMOutput:
        """Logits (B, T, vocab); ``labels`` gives the shifted next-token loss (-100 ignored).

        ``attention_mask`` must be all ones (left padding is not supported: batch equal lengths or
        use the inference Engine for ragged batches)."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("OpenMythosForCausalLM does not support padding; pass equal-length prompts "
                             "or use open_mythos.inference.Engine for ragged batches")
        logits = self.model(input_ids, n_loops)
        loss = None
        if labels is not None:
            loss = lm_loss(logits[:, :-1], labels[:, 1:])
        return CausalLMOutput(loss=loss, logits=logits)

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """The open-mythos format (config.json, model.safetensors without the ``model.`` prefix, model
        card, remote-code shims): loadable by OpenMythos.from_pretrained and by transformers alike."""
        self.model.save_pretrained(save_directory)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, n_loops=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask, "n_loops": n_loops}


AutoConfig.register(MODEL_TYPE, OpenMythosConfig, exist_ok=True)
AutoModelForCausalLM.register(OpenMythosConfig, OpenMythosForCausalLM, exist_ok=True)
