"""A generation task's client: its SLM is a causal LM tuned on its private (input, target) pairs.

Everything but the model is `ClientBase`'s: the held-out part (stratified by condition), the upload, the
acceptance rule and saving. The acceptance rule compares the mean ROUGE-L F1 of the two models' greedy
targets on the held-out pairs, by bootstrap as for classification.
"""

from __future__ import annotations

from typing import Any

import torch

from crosslm.catalogue.models import load_causal_slm
from crosslm.client.client import ClientBase, ClientData
from crosslm.config import ClientConfig, GenerationTaskConfig
from crosslm.errors import ConfigError
from crosslm.evaluation.generation import distinct_2, rouge_l_scores, target_perplexity
from crosslm.modeling.causal_slm import PairFormat, fit_pairs, greedy_generate
from crosslm.seeding import pass_seed
from crosslm.task import GenerationPairs, TaskSpec


def rouge_worse_share(
    own: list[float], offered: list[float], *, tolerance: float, draws: int = 500, seed: int = 0
) -> float:
    """The share of bootstrap draws of the held-out pairs (both models on the same draw) on which the
    offered model's mean ROUGE-L is below the own model's minus `tolerance`."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.tensor(own, dtype=torch.float), torch.tensor(offered, dtype=torch.float)
    idx = torch.randint(len(a), (draws, len(a)), generator=gen)
    return float((b[idx].mean(1) < a[idx].mean(1) - tolerance).float().mean())


class GenerationClient(ClientBase[GenerationPairs]):
    """The client of a generation task. `task_cfg` gives the target token budget (training, scoring and
    greedy decoding) and the acceptance rule's ROUGE-L tolerance."""

    metric = "rouge_l"

    def __init__(
        self,
        client_id: str,
        slm: str,
        task: TaskSpec,
        data: ClientData[GenerationPairs],
        cfg: ClientConfig,
        *,
        task_cfg: GenerationTaskConfig,
        eval_batch_size: int,
        max_payload_bytes: int,
        seed: int,
    ):
        if cfg.keep_weight > 0:
            raise ConfigError(
                f"clients.keep_weight is {cfg.keep_weight}, but it anchors a classifier's label predictions "
                "and a generation task's SLMs write text: set clients.keep_weight: 0 for a generation task."
            )
        self.task_cfg = task_cfg
        self.fmt = PairFormat(task.target_noun, max_input_tokens=cfg.max_length,
                              max_target_tokens=task_cfg.max_target_tokens)  # fmt: skip
        super().__init__(client_id, slm, task, data, cfg, eval_batch_size=eval_batch_size,
                         max_payload_bytes=max_payload_bytes, seed=seed)  # fmt: skip

    def _load_model(self) -> tuple[Any, Any]:
        return load_causal_slm(self.slm)

    def _predict(self, data: GenerationPairs) -> list[str]:
        return greedy_generate(self.model, self.tokenizer, data.inputs, max_new_tokens=self.fmt.max_target_tokens,
                               fmt=self.fmt, batch_size=self.eval_batch_size)  # fmt: skip

    def _score(self, data: GenerationPairs) -> dict[str, float]:
        outputs = self._predict(data)
        scores = rouge_l_scores(outputs, data.targets)
        return {
            "rouge_l": sum(scores) / len(scores) if scores else float("nan"),
            "target_perplexity": target_perplexity(
                self.model,
                self.tokenizer,
                data.inputs,
                data.targets,
                fmt=self.fmt,
                batch_size=self.eval_batch_size,
            ),  # fmt: skip
            "distinct_2": distinct_2(outputs),
        }

    def _held_out_metrics(self, outputs: list[Any]) -> dict[str, float]:
        scores = rouge_l_scores(outputs, self.data.held_out.targets)
        return {"rouge_l": sum(scores) / len(scores) if scores else float("nan")}

    def _worse_share(self, own: list[Any], offered: list[Any], update: int) -> float:
        targets = self.data.held_out.targets
        return rouge_worse_share(rouge_l_scores(own, targets), rouge_l_scores(offered, targets),
                                 tolerance=self.tolerance, seed=pass_seed(self.seed, "accept", update))  # fmt: skip

    @property
    def tolerance(self) -> float:
        return self.task_cfg.accept_tolerance

    def _train_private(self, epochs: int, seed: int, desc: str) -> float:
        train = self.data.train
        return fit_pairs(self.model, self.tokenizer, train.inputs, train.targets, lr=self.cfg.lr,
                         batch_size=self.cfg.batch_size, seed=seed, epochs=epochs, fmt=self.fmt,
                         autocast=self.cfg.autocast, desc=desc)  # fmt: skip
