"""Captioning metrics with the COCO caption evaluation tools (pycocoevalcap).

Published captioning numbers (COCO / Flickr30k / MSVD in the Uni-Perceiver paper and everywhere
else) come from the coco-caption code: captions are lower-cased and tokenised by the Stanford PTB
tokenizer (a Java program) with punctuation removed, then BLEU-1..4, METEOR (Java), ROUGE-L, CIDEr
(-D, with document frequencies from the evaluated references) and optionally SPICE (Java plus the
Stanford CoreNLP 3.6.0 jars, which pycocoevalcap downloads on first use). We call exactly those
scorers so that numbers are comparable; we never download anything, so SPICE is skipped, and said
to be skipped, when its jars are not already installed.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Hashable, Literal, Mapping, Sequence

from uniperceiver.metrics import MetricError

__all__ = ["caption_scores", "spice_jar_paths", "java_available"]

_SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def _import_pycocoevalcap() -> Any:
    try:
        import pycocoevalcap  # noqa: F401
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as exc:
        raise MetricError(
            f"caption metrics need the 'pycocoevalcap' package ({exc}); install it with "
            "`pip install pycocoevalcap` (or the project's [eval] extra)") from exc
    return Bleu, Cider, Rouge


def java_available() -> bool:
    """True when a `java` executable is on PATH (the PTB tokenizer, METEOR and SPICE need it)."""
    return shutil.which("java") is not None


def spice_jar_paths() -> list[Path]:
    """The Stanford CoreNLP jars SPICE needs, where pycocoevalcap's spice module looks for them.

    pycocoevalcap's `Spice()` downloads them from nlp.stanford.edu into `spice/lib/` when absent;
    we only look, so that evaluation never touches the network.
    """
    import pycocoevalcap.spice as spice_pkg

    lib = Path(list(spice_pkg.__path__)[0]) / "lib"
    return [lib / name for name in _SPICE_CORENLP_JARS]


def _validate(predictions: Mapping[Hashable, str],
              references: Mapping[Hashable, Sequence[str]]) -> list[Hashable]:
    if not isinstance(predictions, Mapping) or not isinstance(references, Mapping):
        raise MetricError("predictions and references must be dicts keyed by image/video id")
    missing = [k for k in references if k not in predictions]
    extra = [k for k in predictions if k not in references]
    if missing or extra:
        raise MetricError(
            f"predictions and references must have the same ids: {len(missing)} reference id(s) without a "
            f"prediction (e.g. {missing[:3]!r}), {len(extra)} prediction id(s) without references "
            f"(e.g. {extra[:3]!r}); check int vs str ids")
    if not predictions:
        raise MetricError("predictions: nothing to evaluate (no ids)")
    ids = list(predictions)
    for k in ids:
        if not isinstance(predictions[k], str):
            raise MetricError(f"predictions[{k!r}]: expected one caption string, got {type(predictions[k]).__name__}")
        refs = references[k]
        if isinstance(refs, str) or not isinstance(refs, Sequence) or len(refs) == 0:
            raise MetricError(f"references[{k!r}]: expected a non-empty list of caption strings, got {refs!r}")
        for r in refs:
            if not isinstance(r, str):
                raise MetricError(f"references[{k!r}]: every reference must be a string, got {r!r}")
    return ids


def _ptb_tokenize(captions: dict[int, list[str]]) -> dict[int, list[str]]:
    """PTB-tokenise like pycocoevalcap's `PTBTokenizer.tokenize`, one line per caption.

    Same jar, same command (`edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase`),
    same punctuation list removed afterwards, so the tokens are identical. Differences are only
    plumbing: the input file goes to a private temp folder instead of site-packages (which may be
    read-only), Java's progress line on stderr is captured instead of printed, and a failure
    raises a clear error instead of silently mis-aligning captions.
    """
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    jar = Path(ptb.__file__).resolve().parent / ptb.STANFORD_CORENLP_3_4_1_JAR
    if not jar.is_file():
        raise MetricError(f"PTB tokenizer jar not found at {jar} (reinstall pycocoevalcap)")
    keys = [k for k, caps in captions.items() for _ in caps]
    # One caption per line: line breaks inside a caption would shift every later caption.
    sentences = "\n".join(c.replace("\n", " ") for caps in captions.values() for c in caps)
    with tempfile.TemporaryDirectory(prefix="upctl-ptb-") as tmp:
        src = Path(tmp) / "captions.txt"
        src.write_bytes(sentences.encode())
        cmd = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
               "-preserveLines", "-lowerCase", str(src)]
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
        except OSError as exc:
            raise MetricError(f"PTB tokenizer could not start ({' '.join(cmd[:3])} ...): {exc}") from exc
    if proc.returncode != 0:
        raise MetricError(f"PTB tokenizer (java, {jar.name}) exited with code {proc.returncode}: "
                          f"{proc.stderr.decode(errors='replace').strip()[-500:]}")
    lines = proc.stdout.decode().split("\n")
    if len(lines) < len(keys):
        raise MetricError(f"PTB tokenizer returned {len(lines)} lines for {len(keys)} captions")
    out: dict[int, list[str]] = {k: [] for k in captions}
    for k, line in zip(keys, lines):
        out[k].append(" ".join(w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS))
    return out


def _run_meteor(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    try:
        scorer = Meteor()
    except OSError as exc:
        raise MetricError(f"METEOR (java -jar meteor-1.5.jar) could not start: {exc}") from exc
    try:
        score, _ = scorer.compute_score(gts, res)
    except (ValueError, BrokenPipeError) as exc:
        err = b""
        with contextlib.suppress(Exception):
            scorer.meteor_p.kill()
            err = scorer.meteor_p.stderr.read()[-500:]
        raise MetricError(f"METEOR failed ({exc}); java said: {err.decode(errors='replace').strip()}") from exc
    finally:
        # Meteor keeps a 2 GB JVM alive until garbage collection; stop it now.
        with contextlib.suppress(Exception):
            scorer.meteor_p.stdin.close()
            scorer.meteor_p.kill()
            scorer.meteor_p.wait(timeout=10)
    return float(score)


def _run_spice(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    from pycocoevalcap.spice.spice import Spice

    scorer = Spice.__new__(Spice)  # skip __init__: it would download CoreNLP if the jars vanished
    try:
        score, _ = scorer.compute_score(gts, res)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise MetricError(f"SPICE (java -jar spice-1.0.jar) failed: {exc}") from exc
    return float(score)


def caption_scores(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], *,
                   spice: bool | Literal["auto"] = "auto", meteor: bool = True,
                   tokenize: bool = True) -> dict[str, Any]:
    """COCO caption metrics of one predicted caption per item against its reference captions.

    Returns ``{"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE",
    "skipped", "num_items"}`` with the scores as pycocoevalcap gives them (fractions: multiply by
    100 for the paper's tables, e.g. BLEU-4 0.364 -> 36.4). A metric that was not computed is
    ``None`` and ``skipped`` lists why. BLEU is the corpus-level score (n-gram counts pooled over
    all items, "closest" reference length), CIDEr is CIDEr-D with document frequencies from these
    references, as in coco-caption.

    - `tokenize=True` runs the PTB tokenizer (Java) on both sides, as coco-caption does; pass
      False only for captions that are already PTB-tokenised, lower-cased and punctuation-free.
    - `meteor=False` skips METEOR (it starts a 2 GB JVM and takes several seconds).
    - `spice="auto"` computes SPICE only when its Stanford CoreNLP jars are already installed
      (see `spice_jar_paths`), and lists it under ``skipped`` if they are absent or SPICE fails;
      True makes either an error; False skips it.

    Java is required for tokenisation, METEOR and SPICE: without it an error names what needs it.
    """
    ids = _validate(predictions, references)
    Bleu, Cider, Rouge = _import_pycocoevalcap()
    if spice not in (True, False, "auto"):
        raise MetricError(f"spice: expected True, False or 'auto', got {spice!r}")
    spice = "auto" if spice == "auto" else bool(spice)
    skipped: list[str] = []

    jars = spice_jar_paths()
    missing_jars = [p for p in jars if not p.is_file()]
    run_spice = bool(spice) and not missing_jars
    if spice is True and missing_jars:
        raise MetricError(f"SPICE requested but the Stanford CoreNLP jar is not found at {missing_jars[0]} "
                          "(pycocoevalcap downloads it on first use; this tool never downloads)")
    if spice == "auto" and missing_jars:
        skipped.append(f"SPICE: Stanford CoreNLP jar not found at {missing_jars[0]}")
    elif spice is False:
        skipped.append("SPICE: disabled (spice=False)")
    if not meteor:
        skipped.append("METEOR: disabled (meteor=False)")

    needs_java = [name for name, used in (("the PTB tokenizer", tokenize), ("METEOR", meteor),
                                          ("SPICE", run_spice)) if used]
    if needs_java and not java_available():
        raise MetricError(f"java not found on PATH; it is needed by {', '.join(needs_java)}. Install a Java "
                          "runtime (e.g. apt-get install default-jre-headless), or pass meteor=False and "
                          "tokenize=False with pre-tokenised captions")

    # Internal integer keys: the scorers assume equal key order on both sides and SPICE
    # round-trips ids through JSON, so user ids (str, int, tuples) never reach them.
    gts_raw = {i: list(references[k]) for i, k in enumerate(ids)}
    res_raw = {i: [predictions[k]] for i, k in enumerate(ids)}
    if tokenize:
        # One Java start for both sides: with -preserveLines every line is tokenised on its own.
        n = len(ids)
        both = _ptb_tokenize({**gts_raw, **{n + i: caps for i, caps in res_raw.items()}})
        gts = {i: both[i] for i in range(n)}
        res = {i: both[n + i] for i in range(n)}
    else:
        gts, res = gts_raw, res_raw

    out: dict[str, Any] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its length ratios
        bleu, _ = Bleu(4).compute_score(gts, res)
    for order, v in enumerate(bleu, start=1):
        out[f"Bleu_{order}"] = float(v)
    out["METEOR"] = _run_meteor(gts, res) if meteor else None
    out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    out["SPICE"] = None
    if run_spice:
        try:
            out["SPICE"] = _run_spice(gts, res)
        except MetricError as exc:
            if spice is True:
                raise
            # "auto": an optional extra must not sink the other metrics; say why it is missing.
            skipped.append(f"SPICE: {exc}")
    out["skipped"] = skipped
    out["num_items"] = len(ids)
    return out
