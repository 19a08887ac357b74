"""`polar score`'s run over its input file (engine/score.py's main starts it): every line checked before
the model is loaded, the rows a stopped run kept continued after, then the input read, tokenized and packed a
chunk at a time (on a second thread while the model scores the chunk before: engine/read_ahead.py), each model
replica scoring its share of a chunk with engine/score.py's CheckpointScorer, rank 0 appending the chunk's rows
to OUTPUT.partial (polar/score_output.py), and the run's summary."""
from __future__ import annotations

import os
import time

from engine.config import ConfigError
from engine.read_ahead import prepared_ahead
from engine.score import CheckpointScorer, writable_output


def score_settings(args, scorer: CheckpointScorer) -> dict:
    """What a partial output is checked against before a rerun continues it: everything that changes
    a reward (checkpoint, tokenizer, the client's truncation, precision) and the input itself. Not the
    layout, the packed length or --on-error: they change how lines are scored, not their rewards."""
    st = os.stat(args.input)
    return {"checkpoint": os.path.realpath(scorer.step_dir), "tokenizer": scorer.tokenizer_spec,
            "max_length": scorer.max_length, "max_response_length": scorer.max_response_length,
            "precision": args.precision, "input": os.path.realpath(args.input), "input_bytes": st.st_size,
            "input_mtime_ns": st.st_mtime_ns}


def run(args, interrupts, leaves: list) -> int:
    """args' input scored into args' output; `leaves[0]`, what a stop leaves, kept up to date (engine.interrupt's
    exit_status says it)."""
    import contextlib

    # the partial output's writer is closed however the run ends (polar/score_output.py, RowWriter)
    with contextlib.ExitStack() as held:
        return _scored(args, interrupts, leaves, held)


def _scored(args, interrupts, leaves: list, held) -> int:
    import itertools

    from engine.runtime import shutdown_runtime
    from polar.client_format import Cuts
    from polar.records import RecordError
    from polar.score_input import iter_score_input, output_row, survey_score_input
    from engine.score_ranks import earliest, gathered, same_on_every_rank
    from polar.score_output import ResumeError, RowWriter, check_settings, partial_paths, rows_written

    t0 = time.time()
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if main_rank:  # the check and the model's load take minutes at 7B: said before them, not after
        print(f"checking every line of {args.input} before the model is loaded", flush=True)
    scorer = CheckpointScorer(args.checkpoint, args.tokenizer, args.tp, args.pp, args.precision,
                              args.max_length, args.max_response_length)
    try:  # every line checked before a model is loaded; the texts are read again chunk by chunk
        numbers, bad, first_bad = survey_score_input(args.input, args.on_error)
    except RecordError as e:
        raise ConfigError(f"{e} (--on-error skip writes an error line instead)") from None
    except OSError as e:
        raise ConfigError(f"--input {args.input}: {e}") from None
    if bad and main_rank:  # the output file holds them all
        print(f"{bad} bad line(s), written as error lines (--on-error skip); the first: {first_bad}", flush=True)
    scorer.check_seq_length(args.seq_length)
    # without --seq-length, or with one past them, the model's positions bound a packed row (as in groups())
    positions = scorer.model_cfg.max_position_embeddings
    limit, bound = ((args.seq_length, f"--seq-length {args.seq_length}") if 0 < args.seq_length <= positions
                    else (positions, f"model.max_position_embeddings={positions}"))
    writable_output(args.output, "--output", {"--input": args.input})
    partial, _ = partial_paths(args.output)
    if os.path.exists(partial) and os.path.samefile(partial, args.input):
        raise ConfigError(f"--input {args.input} is where this --output's rows go while the run writes them "
                          f"({partial}); name another --output")
    settings = score_settings(args, scorer)
    try:
        # locked before its rows are read: a torn last row may be one another run is still writing,
        # and cutting it under that run lost the rows it had written past the cut
        writer = held.enter_context(RowWriter(args.output, settings)) if main_rank else None
        done = rows_written(args.output, numbers, cut_torn=main_rank) if check_settings(args.output, settings) else 0
    except ResumeError as e:
        raise ConfigError(str(e)) from None

    def kept(rows: int) -> None:
        leaves[0] = f"{rows:,} of {len(numbers):,} lines are kept in {partial}; the same command continues"

    if done:  # else leaves[0] stays "before the scoring began": a stop now leaves no partial output (RowWriter.close)
        kept(done)
    if done and main_rank:
        print(f"resuming: {done:,} of {len(numbers):,} lines are already scored in {partial} (a stopped run's); "
              f"scoring the other {len(numbers) - done:,}", flush=True)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    # every rank reads (parses) a whole chunk and scores its share: a cap keeps that bounded at large DP
    chunk_lines = args.chunk_lines or min(1024 * max(1, world // (args.tp * args.pp)), 16384)
    # the lines checked, no more: a file still being appended to gets no unchecked line scored
    unscored = (numbers[done - 1] if done else 0, numbers[-1] if len(numbers) else 0)
    source = iter_score_input(args.input, args.on_error, after_line=unscored[0], until_line=unscored[1])
    read = done  # lines of `numbers` read so far

    def next_chunk():
        nonlocal read
        try:
            chunk = list(itertools.islice(source, chunk_lines))
        except RecordError as e:  # a line that passed the check: the file changed under the run
            raise ConfigError(f"{e}: the input changed after it was checked (it was not written out "
                              f"whole before polar score started?); rows before it are kept in {partial}") from None
        # a file cut short under the run ended the chunks early: OUTPUT was written without the lines it lost
        got, want = [ln.line for ln in chunk], numbers[read:read + chunk_lines].tolist()
        if got != want:
            at = next(g if w is None else w for g, w in itertools.zip_longest(got, want) if g != w)
            raise ConfigError(f"{args.input}:{at}: the input changed after it was checked (its non-blank lines are "
                              f"not the ones checked); rows before this chunk are kept in {partial}")
        read += len(chunk)
        return chunk

    scorer.start_runtime()
    rt = scorer.rt
    same_on_every_rank(done, rt)
    if args.on_error == "fail":
        from polar.score_length_check import first_too_long

        first_too_long(scorer.encoded, scorer.tokenizer, scorer.max_length, args.input, numbers[done:], limit, bound,
                       chunk_lines, rt.rank, rt.world_size, lambda found: earliest(found, rt))
    scorer.load()
    from engine.progress import scoring_progress
    from polar.score_length_check import too_long_message

    report, left = scoring_progress(args.progress_s, rt.is_main, unit="lines"), len(numbers) - done
    totals = {"sequences": 0, "outputs": 0, "prefix_tokens_saved": 0, "bad": 0}
    cuts, over_names, lengths, lines_done = Cuts(), [], set(), 0

    def prepare() -> tuple:
        # each model replica tokenizes and packs its share of the chunk's lines only
        lines = next_chunk()
        return lines, _prepared_share(scorer, [ln for ln in lines if ln.error is None][rt.dp_rank::rt.dp], args,
                                      limit)

    for lines, prepared in prepared_ahead(prepare, lambda chunk: not chunk[0], ahead=not args.no_prefetch):
        share = _scored_share(scorer, prepared, lambda d, t: report(lines_done + len(lines) * d / max(t, 1), left))
        outcome, facts, share_cuts = gathered(share, rt)
        for k in ("sequences", "outputs", "prefix_tokens_saved"):
            totals[k] += sum(f[k] for f in facts)
        lengths.update(f["seq_length"] for f in facts if f["sequences"])
        for c in share_cuts:
            cuts.add(c)
        over = sorted(line for line, got in outcome.items() if isinstance(got, int))  # token counts: too long
        if over and args.on_error != "skip":
            stop = [ln for ln in lines if ln.line < over[0]]  # kept: the rows before the line that stops the run
            if writer is not None:
                writer.write([output_row(ln, outcome.get(ln.line, [])) for ln in stop])
            before = done + lines_done + len(stop)
            kept = (f"; the {before:,} lines before it are kept in {partial}, and a rerun continues after them"
                    if before else "")
            raise ConfigError(f"{args.input}:{over[0]}: {too_long_message(outcome[over[0]], bound)} (--on-error "
                              f"skip writes an error line instead{kept})")
        too_long = set(over)
        for ln in lines:
            if ln.line in too_long:
                ln.error = too_long_message(outcome[ln.line], bound)
                over_names.append(f"{args.input}:{ln.line}")
        with interrupts.whole():  # a stop leaves the chunk's rows written whole, and says so
            if writer is not None:
                writer.write([output_row(ln, outcome.get(ln.line, [])) for ln in lines])
            lines_done += len(lines)
            kept(done + lines_done)
        totals["bad"] += sum(ln.error is not None for ln in lines)
        report(lines_done, left)
    with interrupts.whole():
        if rt.is_main:
            writer.finish()
        leaves[0] = f"every line is scored, in {args.output}"
    if rt.is_main:
        if over_names:
            print(f"{len(over_names)} line(s) longer than {bound}, written as error lines (--on-error skip): "
                  f"{', '.join(over_names[:5])}" + (" ..." if len(over_names) > 5 else ""), flush=True)
        longest = max(lengths, default=0)
        packed = f"{'up to ' if len(lengths) > 1 else ''}{longest} tokens"
        resumed = f", after the {done:,} a stopped run had scored" if done else ""
        bad = totals['bad']  # beside the lines counted, not among them: "of 3 lines (1 bad)" read as one of the 3
        print(f"scored {totals['outputs']:,} outputs of {lines_done - bad:,} lines "
              f"(and {bad} bad line{'' if bad == 1 else 's'}"
              f"{resumed}) in {totals['sequences']:,} packed sequences of {packed} at tp={rt.tp} pp={rt.pp} "
              f"dp={rt.dp}; shared prefixes saved {totals['prefix_tokens_saved']:,} tokens; "
              f"{time.time() - t0:.1f}s; wrote {args.output}", flush=True)
        # a reward read from a response cut to its head never saw its end; nothing in the output says so
        print(f"the client's truncation (--max-length {scorer.max_length}, --max-response-length "
              f"{scorer.max_response_length}) cut {cuts} of the input", flush=True)
    shutdown_runtime()
    return 0


def _prepared_share(scorer: CheckpointScorer, mine: list, args, limit: int) -> tuple:
    """The host's part of this replica's share of a chunk (on the preparing thread): {line number:
    the token count of a line too long to fit `limit`}, the other lines and their packed sequences
    (None when there are none), and what the client's truncation cut."""
    groups = scorer.groups([ln.items for ln in mine], args.seq_length)
    cuts = scorer.cuts  # read in the thread that set it: groups() of the next chunk sets it again
    too_long = {ln.line: len(g) for ln, g in zip(mine, groups) if len(g) > limit}
    kept = [(ln, g) for ln, g in zip(mine, groups) if ln.line not in too_long]
    packed = (scorer.pack([g for _, g in kept], args.seq_length, where=lambda i: f"{args.input}:{kept[i][0].line}")
              if kept else None)
    return too_long, [ln for ln, _ in kept], packed, cuts


def _scored_share(scorer: CheckpointScorer, prepared: tuple, progress) -> tuple:
    """This replica's share of a chunk scored: {line number: rewards, or the token count of a line
    too long}, the packing facts and what the client's truncation cut."""
    outcome, kept, packed, cuts = prepared
    outcome = dict(outcome)
    facts = {"sequences": 0, "outputs": 0, "prefix_tokens_saved": 0, "seq_length": 0}
    if packed is not None:
        rewards, facts = scorer.score_packed(packed, progress=progress, data_parallel=False)
        outcome.update((ln.line, r) for ln, r in zip(kept, rewards))
    return outcome, facts, cuts
