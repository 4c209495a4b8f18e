"""What a task is: its labels, how the LLM is asked to write each label, and how it is asked to classify.

Classification is the first task type. `kind` leaves room for a generative task (the SLM would then be a
causal LM scored by likelihood) without changing any message format: messages carry the label list and the
model config, not task-specific fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TaskSpec:
    name: str
    labels: tuple[str, ...]
    """Label names as they appear in the data (e.g. 'negative', 'positive'); index = class id."""
    descriptions: tuple[str, ...]
    """d(y): what the LLM is asked to write for each label, e.g. 'negative'."""
    verbalizer: tuple[str, ...]
    """The label strings the LLM answers with when it classifies (capitalised, against label-word bias)."""
    generation_prompt: str
    """P(y): user message with {description}, e.g. 'Write a short {description} movie review.'"""
    classification_prompt: str
    """User message with {text} and {options}, answered by one of the verbalizer strings."""
    text_noun: str = "text"
    kind: str = "classification"
    description: str = ""
    """What the texts are, in the task owner's words (`data.task_description`), e.g. 'movie reviews'."""

    def __post_init__(self) -> None:
        n = len(self.labels)
        if n < 2:
            raise ValueError(f"task {self.name!r} needs at least 2 labels, got {self.labels}")
        if len(self.descriptions) != n or len(self.verbalizer) != n:
            raise ValueError(f"task {self.name!r}: labels, descriptions and verbalizer differ in length")
        if len(set(self.verbalizer)) != n:
            raise ValueError(f"task {self.name!r}: verbalizer strings must be distinct")

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def prompt_for(self, label: int) -> str:
        return self.generation_prompt.format(description=self.descriptions[label])

    def classify_prompt(self, text: str) -> str:
        return self.classification_prompt.format(text=text, options=", ".join(self.verbalizer))

    def wording(self) -> dict[str, str | list[str]]:
        """Everything the LLM is told about the task, as JSON. A run records it in its run_start, so a
        catalogue prompt edited later shows as drift when the run is reused (crosslm.experiment)."""
        return {
            "descriptions": list(self.descriptions),
            "verbalizer": list(self.verbalizer),
            "generation_prompt": self.generation_prompt,
            "classification_prompt": self.classification_prompt,
        }


@dataclass
class LabelledTexts:
    """Parallel lists of texts and integer labels (indices into TaskSpec.labels)."""

    texts: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError("texts and labels differ in length")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: list[int]) -> LabelledTexts:
        return LabelledTexts([self.texts[i] for i in idx], [self.labels[i] for i in idx])

    def label_counts(self, num_labels: int) -> list[int]:
        counts = [0] * num_labels
        for y in self.labels:
            counts[y] += 1
        return counts
