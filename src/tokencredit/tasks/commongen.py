"""CommonGen: write one everyday sentence that uses every word of a given concept set.

A record (a JSONL line, a dict, or a row of a Hugging Face dataset) looks like::

    {"concepts": ["dog", "frisbee", "catch", "throw"],
     "references": ["A dog leaps to catch a thrown frisbee.", "The dog catches the frisbee when the boy throws it."]}

``references`` may be missing or empty (a blind test split); such records can be prompted but not scored.
``id`` is optional; other fields (``concept_set`` with part-of-speech tags, ``reasons``) are ignored.

Scoring. RLGF rewards CommonGen with SPICE + CIDEr. Neither is available offline here: SPICE needs a Java
scene-graph parser and CIDEr needs pycocoevalcap, neither installed. We use what is: ROUGE-L (``rouge-score``)
and sentence BLEU (``sacrebleu``) against the references, plus concept coverage computed here, which
measures the task's own constraint directly. Numbers are therefore not comparable with papers' CIDEr/SPICE.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tokencredit.record_files import RecordError, read_jsonl

if TYPE_CHECKING:
    import datasets

    from tokencredit.rewards.tokens import RewardFn

INSTRUCTION = "Write one short, everyday sentence that uses all of these words: {concepts}."
BASE_PROMPT_END = "Sentence:"
"""Last line of a plain-text (base model) prompt; the response then starts with a space."""

DEFAULT_WEIGHTS = {"coverage": 0.5, "rouge_l": 0.25, "bleu": 0.25}
"""Weights of :func:`commongen_reward`. Coverage gets half: it is the task's hard constraint and gives credit
per concept, so it is dense where BLEU on one short sentence is often near zero. ROUGE-L and BLEU share the
other half: they reward sentences that read like what people wrote (word choice, order), which coverage alone
would not (a bare list of the concepts covers everything)."""

_WORD = re.compile(r"[a-z0-9]+")

# Irregular English forms a suffix stemmer cannot join to their lemma: "lemma: form form ...". Written for
# the everyday verbs and nouns CommonGen draws its concepts from; regular inflections are left to the stemmer.
_IRREGULAR_TABLE = """
arise: arose arisen | awake: awoke awoken | be: am is are was were been | bear: bore borne born
beat: beaten | become: became | begin: began begun | bend: bent | bite: bit bitten | bleed: bled
blow: blew blown | break: broke broken | breed: bred | bring: brought | build: built | burn: burnt
buy: bought | catch: caught | choose: chose chosen | cling: clung | come: came | creep: crept
deal: dealt | dig: dug | dive: dove | do: did done does | draw: drew drawn | dream: dreamt
drink: drank drunk | drive: drove driven | dwell: dwelt | eat: ate eaten | fall: fell fallen
feed: fed | feel: felt | fight: fought | find: found | flee: fled | fling: flung | fly: flew flown
forbid: forbade forbidden | forget: forgot forgotten | forgive: forgave forgiven | freeze: froze frozen
get: got gotten | give: gave given | go: went gone goes | grind: ground | grow: grew grown
hang: hung | have: has had | hear: heard | hide: hid hidden | hold: held | hurt: hurts
keep: kept | kneel: knelt | know: knew known | lay: laid | lead: led | leap: leapt
learn: learnt | leave: left | lend: lent | lie: lay lain lying | light: lit | lose: lost | make: made
mean: meant | meet: met | mow: mown | overtake: overtook overtaken | pay: paid | prove: proven
ride: rode ridden | ring: rang rung | rise: rose risen | run: ran | say: said | see: saw seen
seek: sought | sell: sold | send: sent | sew: sewn | shake: shook shaken | shine: shone
shoot: shot | show: shown | shrink: shrank shrunk | sing: sang sung | sink: sank sunk | sit: sat
sleep: slept | slide: slid | sling: slung | smell: smelt | speak: spoke spoken | speed: sped
spend: spent | spill: spilt | spin: spun | spit: spat
spring: sprang sprung | stand: stood | steal: stole stolen | stick: stuck | sting: stung | stink: stank
stride: strode | strike: struck stricken | string: strung | strive: strove striven | swear: swore sworn
sweep: swept | swim: swam swum | swing: swung | take: took taken | teach: taught | tear: tore torn
tell: told | think: thought | throw: threw thrown | tread: trod trodden | wake: woke woken
wear: wore worn | weave: wove woven | weep: wept | win: won | wind: wound | wring: wrung
write: wrote written | child: children | foot: feet | goose: geese | man: men | mouse: mice
ox: oxen | person: people | tooth: teeth | woman: women | leaf: leaves | knife: knives | wife: wives
life: lives | wolf: wolves | shelf: shelves | loaf: loaves | calf: calves | half: halves | thief: thieves
"""


def _parse_irregular(table: str) -> dict[str, frozenset[str]]:
    """Map every form (lemma included) to the set of lemmas it can be a form of."""
    lemmas_of: dict[str, set[str]] = {}
    for entry in table.replace("\n", " | ").split("|"):
        if not entry.strip():
            continue
        lemma, forms = entry.split(":")
        for form in [lemma.strip(), *forms.split()]:
            lemmas_of.setdefault(form, set()).add(lemma.strip())
    return {form: frozenset(lemmas) for form, lemmas in lemmas_of.items()}


_IRREGULAR = _parse_irregular(_IRREGULAR_TABLE)


class ConceptDataError(RecordError):
    """A CommonGen record that cannot be used; the message says where ("file:line" or "record N")."""


@dataclass
class ConceptSet:
    """The concepts a sentence must use and the human-written reference sentences (possibly none)."""

    concepts: list[str]
    references: list[str] = field(default_factory=list)
    id: str | None = None


# ---------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------


def parse_concept_set(obj: dict, where: str) -> ConceptSet:
    """Validate one record and build a ConceptSet; errors are ConceptDataError starting with ``where``."""
    if not isinstance(obj, dict):
        raise ConceptDataError(f"{where}: expected an object with 'concepts' and 'references', "
                               f"got {type(obj).__name__}")
    concepts = obj.get("concepts")
    if concepts is None:
        raise ConceptDataError(f"{where}: missing 'concepts' (a list of words, e.g. [\"dog\", \"frisbee\"])")
    if not isinstance(concepts, list) or not all(isinstance(c, str) and c.strip() for c in concepts):
        raise ConceptDataError(f"{where}: 'concepts' must be a list of non-empty strings, got {concepts!r}")
    if not concepts:
        raise ConceptDataError(f"{where}: 'concepts' is empty")
    references = obj.get("references")
    if references is None:
        references = []
    if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        raise ConceptDataError(f"{where}: 'references' must be a list of strings, got {references!r}")
    references = [" ".join(r.split()) for r in references if r.strip()]
    record_id = obj.get("id")
    return ConceptSet([c.strip() for c in concepts], references, None if record_id is None else str(record_id))


def load_concept_sets(source: str | Path | Sequence[dict] | datasets.Dataset) -> list[ConceptSet]:
    """Concept sets from a .jsonl file (errors name "file:line") or dicts / an HF dataset ("record N", 0-based)."""
    if isinstance(source, (str, Path)):
        where = str(source)
        try:
            records = [parse_concept_set(obj, f"{source}:{lineno}") for lineno, obj in read_jsonl(source)]
        except ConceptDataError:
            raise
        except RecordError as exc:  # bad JSON or a missing file: one error type for every data problem
            raise ConceptDataError(str(exc)) from exc
    else:
        where = "the given records"
        records = [parse_concept_set(obj, f"record {i}") for i, obj in enumerate(source)]
    if not records:
        raise ConceptDataError(f"{where}: no concept sets found")
    return records


# ---------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------


def concept_prompt(concepts: Sequence[str] | ConceptSet, tokenizer: object | None = None,
                   chat: bool | None = None) -> str:
    """The prompt for a concept set: the tokenizer's chat template if it has one (``chat=None``), else plain text.

    Plain text is the instruction, a newline and "Sentence:"; the chat form is the instruction as one user
    message followed by the generation prompt. Concepts are listed in the given order.
    """
    if isinstance(concepts, ConceptSet):
        concepts = concepts.concepts
    if isinstance(concepts, str) or not concepts:
        raise ValueError("concepts must be a non-empty list of words")
    instruction = INSTRUCTION.format(concepts=", ".join(concepts))
    has_chat_template = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    if not (has_chat_template if chat is None else chat):
        return f"{instruction}\n{BASE_PROMPT_END}"
    if not has_chat_template:
        raise ValueError("chat=True needs a tokenizer with a chat_template; pass chat=False for plain text")
    return tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                         add_generation_prompt=True)


# ---------------------------------------------------------------------------------------------------------
# Concept coverage
# ---------------------------------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    """Lowercase letter/digit runs; apostrophes and hyphens split words ("dog's" -> dog, s; "ice-cold" -> ice, cold)."""
    return _WORD.findall(text.lower())


@functools.lru_cache(maxsize=65536)
def lemma_keys(word: str) -> frozenset[str]:
    """Keys under which a lowercase word matches: its Porter stem, and the stems of its irregular lemmas."""
    stem = _stemmer().stem
    return frozenset({stem(word)} | {stem(lemma) for lemma in _IRREGULAR.get(word, ())})


def concept_in(concept: str, sentence_words: Sequence[str]) -> bool:
    """Whether the concept occurs among ``sentence_words`` (see :func:`concept_coverage` for the matching rule)."""
    parts = words(concept)
    if not parts:
        return False
    keys = [lemma_keys(p) for p in parts]
    for start in range(len(sentence_words) - len(parts) + 1):
        if all(keys[j] & lemma_keys(sentence_words[start + j]) for j in range(len(parts))):
            return True
    return False


def concept_coverage(sentence: str, concepts: Sequence[str]) -> float:
    """Share of the concepts (each counted once) that occur in the sentence, inflected or not; in [0, 1].

    A concept matches a word when both reduce to the same key: the Porter stem of the word (so "dogs" ->
    dog, "running" -> run, "dancing"/"dance" -> danc), or, for irregular forms listed in a table here, the stem
    of their lemma ("ran" -> run, "stood" -> stand, "geese" -> goose). Matching is by whole words, case- and
    punctuation-blind; a multi-word concept must appear as consecutive words. Known limits: the stemmer
    sometimes joins unrelated words ("universe"/"university"), an irregular form that is also a word of its
    own counts for both ("saw" covers "see" and "saw"), and derivations are not inflections ("runner" does not
    cover "run"). No NLTK data is needed: the Porter stemmer is code only.
    """
    if isinstance(concepts, str):
        raise ValueError("concepts must be a list of words, not a single string")
    unique = list(dict.fromkeys(c.strip().lower() for c in concepts if c.strip()))
    if not unique:
        raise ValueError("no concepts given")
    sentence_words = words(sentence)
    return sum(concept_in(c, sentence_words) for c in unique) / len(unique)


@functools.lru_cache(maxsize=1)
def _stemmer() -> object:
    """NLTK's Porter stemmer (installed with rouge-score, which uses it; it needs no downloaded data)."""
    from nltk.stem.porter import PorterStemmer

    return PorterStemmer()


# ---------------------------------------------------------------------------------------------------------
# Reward and metrics
# ---------------------------------------------------------------------------------------------------------


def sentence_scores(sentence: str, references: Sequence[str], concepts: Sequence[str]) -> dict[str, float]:
    """``coverage``, ``rouge_l`` (best ROUGE-L F over references, stemmed) and sentence ``bleu``, each in [0, 1].

    BLEU is sacrebleu's sentence BLEU against all references at once (lowercased, 13a tokenization,
    effective order and exponential smoothing, so a sentence shorter than four words still scores), over 100.
    """
    if isinstance(references, str):
        raise ValueError("references must be a list of sentences, not a single string")
    if not references:
        raise ValueError("no references to score against (a blind test record cannot be scored)")
    rouge = _rouge_scorer().score_multi(list(references), sentence)["rougeL"].fmeasure
    bleu = _bleu(sentence_level=True).sentence_score(sentence, list(references)).score / 100.0
    return {"coverage": concept_coverage(sentence, concepts), "rouge_l": float(rouge),
            "bleu": min(1.0, max(0.0, bleu))}


def commongen_reward(sentence: str, references: Sequence[str], concepts: Sequence[str],
                     weights: dict[str, float] | None = None) -> float:
    """Weighted sum of :func:`sentence_scores` (default :data:`DEFAULT_WEIGHTS`: coverage .5, ROUGE-L .25, BLEU .25).

    In [0, 1] when the weights are non-negative and sum to 1; other weights are allowed and scale the range.
    """
    weights = DEFAULT_WEIGHTS if weights is None else weights
    unknown = set(weights) - set(DEFAULT_WEIGHTS)
    if unknown:
        raise ValueError(f"unknown reward weights {sorted(unknown)}; known: {sorted(DEFAULT_WEIGHTS)}")
    scores = sentence_scores(sentence, references, concepts)
    return float(sum(w * scores[name] for name, w in weights.items()))


def first_line(response: str) -> str:
    """The first non-blank line of a response, trimmed: the sentence the task asked for."""
    for line in response.splitlines():
        if line.strip():
            return line.strip()
    return ""


def commongen_reward_fn(records: Sequence[ConceptSet], prompts: Sequence[str] | None = None,
                        weights: dict[str, float] | None = None) -> RewardFn:
    """The reward contract for CommonGen: :func:`commongen_reward` of each response's first line, in [0, 1].

    The task keeps a map from prompt text to record, because the contract hands the reward only the prompt.
    ``prompts[i]`` is the prompt the policy sees for ``records[i]`` (default: :func:`concept_prompt` plain
    text); pass the rendered chat prompts when a chat template is used. Records sharing a prompt pool their
    references. Only the first line is scored, so text after it cannot add coverage; an empty response
    scores 0. A prompt not in the map raises ValueError naming the row.
    """
    if prompts is None:
        prompts = [concept_prompt(r.concepts) for r in records]
    if len(prompts) != len(records):
        raise ValueError(f"{len(prompts)} prompts for {len(records)} records")
    by_prompt: dict[str, ConceptSet] = {}
    for i, (prompt, record) in enumerate(zip(prompts, records)):
        if not record.references:
            raise ValueError(f"record {i} ({', '.join(record.concepts)}) has no references to score against")
        known = by_prompt.get(prompt.strip())
        if known is None:
            by_prompt[prompt.strip()] = ConceptSet(list(record.concepts), list(record.references), record.id)
        else:
            known.references.extend(r for r in record.references if r not in known.references)

    def reward(prompts: list[str], responses: list[str], response_token_ids: list[list[int]]) -> list[float]:
        """Combined CommonGen reward per response (the reward contract)."""
        if not (len(prompts) == len(responses) == len(response_token_ids)):
            raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses and "
                             f"{len(response_token_ids)} token lists; expected one of each per row")
        out = []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            record = by_prompt.get(prompt.strip())
            if record is None:
                raise ValueError(f"row {i}: prompt is not one of this task's prompts: {prompt[:80]!r}")
            sentence = first_line(response)
            out.append(commongen_reward(sentence, record.references, record.concepts, weights) if sentence else 0.0)
        return out

    return reward


def commongen_metrics(predictions: Sequence[str], records: Sequence[ConceptSet]) -> dict[str, float]:
    """Corpus ``bleu``, mean ``rouge_l`` and ``coverage``, ``full_coverage`` (all concepts used), ``mean_length``.

    BLEU is sacrebleu's corpus BLEU over all references (records may hold different numbers of them),
    lowercased, over 100; ROUGE-L is the best F over each record's references; ``mean_length`` is in words.
    Every value but ``mean_length`` is in [0, 1].
    """
    if isinstance(predictions, str):
        raise ValueError("predictions must be a list of sentences, not a single string")
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions but {len(records)} records")
    if not predictions:
        raise ValueError("no predictions to score")
    missing = [i for i, r in enumerate(records) if not r.references]
    if missing:
        raise ValueError(f"record {missing[0]} has no references; blind test records cannot be scored")
    rows = [sentence_scores(p, r.references, r.concepts) for p, r in zip(predictions, records)]
    n = len(rows)
    # sacrebleu wants one stream per reference position; None fills in where a record has fewer references.
    width = max(len(r.references) for r in records)
    streams = [[r.references[k] if k < len(r.references) else None for r in records] for k in range(width)]
    bleu = _bleu(sentence_level=False).corpus_score(list(predictions), streams).score / 100.0
    return {
        "bleu": min(1.0, max(0.0, bleu)),
        "rouge_l": sum(row["rouge_l"] for row in rows) / n,
        "coverage": sum(row["coverage"] for row in rows) / n,
        "full_coverage": sum(math.isclose(row["coverage"], 1.0) for row in rows) / n,
        "mean_length": sum(len(p.split()) for p in predictions) / n,
    }


@functools.lru_cache(maxsize=2)
def _bleu(sentence_level: bool) -> object:
    """A lowercasing sacrebleu BLEU; effective order only for single sentences, where short ones need it."""
    from sacrebleu.metrics import BLEU

    return BLEU(lowercase=True, effective_order=sentence_level)


@functools.lru_cache(maxsize=1)
def _rouge_scorer() -> object:
    """ROUGE-L with Porter stemming (inflections count as matches, in line with concept coverage)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
