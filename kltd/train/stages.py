"""The stages of one training job, as methods of one object that carries what they share.

    Job(cfg, run_dir, out, ...).run()  ->  prepare  ->  load  ->  evaluate before  ->  fill the teacher cache
                                       ->  train  ->  finish (evaluate after, save the student)

`prepare` reads the tokenizer and the data (a bad row costs seconds, not a model load); `load` loads the pair
and makes the execution plan (kltd.rollout.plan), which every later stage reads; `train` is the loop of
optimiser steps with its logging, checkpoints and stop requests. What differs between process 0 and the others
of a data-parallel run sits behind `out` (kltd.train.output.Output) and `ranks` (kltd.train.ranks.Ranks): a
stage does not ask which process it runs in. kltd.train.job wraps a Job with what the run directory needs
(claiming it, resuming, the summary's status).
"""

from __future__ import annotations

import dataclasses
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape

from kltd.report.progress import RunProgress, StepFigures
from kltd.rollout.batch import TokenCounts
from kltd.schema.config import Config, approximations, exact_figures, needs_responses
from kltd.train import checkpoint
from kltd.train.interrupt import Interrupted, stop_requests
from kltd.train.output import Output, before_after_table, data_lines, save_lora_student, save_student
from kltd.train.phases import Phases
from kltd.train.ranks import SINGLE, Ranks

BEFORE_RL = "before_rl"  # the student the RL stage starts from (a LoRA student's: its adapter)


@dataclass
class Job:
    cfg: Config
    run_dir: Path
    out: Output
    config_dict: dict  # the resolved config, redacted: what checkpoints and metrics.json keep
    ranks: Ranks = SINGLE
    sweep: str | None = None
    resume: checkpoint.Checkpoint | None = None
    notes: list[str] = field(default_factory=list)  # the command's lines about this run (kltd.train.job.train_job)
    phases: Phases = field(default_factory=Phases)
    # built by the stages, in this order
    tokenizer: object = None
    data: object = None  # kltd.data.prepare.TaskData
    eval_sets: list = field(default_factory=list)  # kltd.data.eval_sets.EvalSet, in eval.sets order
    pair: object = None  # kltd.train.models.Pair
    plan: object = None  # kltd.rollout.plan.ExecutionPlan
    trainer: object = None  # kltd.train.trainer.Trainer
    display: RunProgress | None = None
    engines: dict = field(default_factory=dict)  # by role, the vLLM samplers the evaluation plan may sample through
    stepper: object = None  # what takes the steps and is checkpointed: the trainer, then the RL stage's Reinforcer
    reward: object = None  # the RL stage's reward (kltd.train.reinforce), settled in prepare
    session: tuple = (0.0, 0.0, 0)  # this session's start: (perf_counter, training time before it, step)
    evaluation_only: bool = False  # a `kltd eval` job: the evaluated model in the student's place, no training
    resumed_from: int | None = None  # the step a resumed run went on from

    def run(self) -> dict:
        """Every stage; the figures of the run (process 0), {} in the other processes."""
        from kltd.train.threads import job_threads, threads_for
        from kltd.train.trainer import Trainer, seed_everything

        seed_everything(self.cfg.seed)
        self.prepare()
        self.load()
        p = self.pair
        with job_threads(threads_for(self.cfg.trainer.num_threads, p.device, (p.teacher, p.student))):
            self.announce()
            self.trainer = Trainer(self.cfg, p, self.data.train, checker=self.data.checker, ranks=self.ranks,
                                   plan=self.plan)
            self.engines = {"student": self.trainer.states.student, "teacher": self.trainer.states.teacher}
            self.stepper = self.trainer
            try:
                with self.display:
                    progress = self.start()
                    self.fill_teacher_cache(progress)
                    trained = self.train(progress)
                    if self.cfg.rl.enabled:
                        trained = self.reinforce(trained)
                    figures = self.finish(trained)
            finally:
                self.trainer.close()  # a vLLM engine dies with its job
        if not self.ranks.main:
            return {}
        self.out.show(before_after_table(self.cfg.method, figures["eval_before"] or {}, figures["eval_after"],
                                         figures.get("eval_after_distillation")))
        return {**figures, "approximations": approximations(self.cfg), "plan": self.plan.record(),
                "data": self.data.summary, "eval_sets": {s.name: s.summary for s in self.eval_sets},
                "phases": self.phases.seconds, "memory": self.phases.memory()}

    # -------------------------------------------------------------------------------------------- stages

    def prepare(self) -> None:
        """The tokenizer and the data, before any weights: a bad row or a tokenizer mismatch costs seconds."""
        from kltd.data.eval_sets import load_sets
        from kltd.data.prepare import prepare, rendered_example

        cfg, m = self.cfg, self.cfg.model
        with self.phases("data"):
            self.served = None
            self.tokenizer = self.teacher_tokenizer(m)
            self.data = prepare(cfg.data, self.tokenizer, needs_responses=needs_responses(cfg))
            self.eval_sets = load_sets(cfg.eval, cfg.eval_sets, cfg.data, self.tokenizer, self.data.eval,
                                       self.data.checker, self.data.chain if exact_figures(cfg) else None)
        self.out.write_text("first_example.txt", rendered_example(self.data.train[0], self.data.end_token))
        if self.data.held_out is not None:
            self.out.write_json("data_split.json", {"held_out_rows": self.data.held_out, **self.data.summary})
        for line in data_lines(self.data.summary):
            self.out.say(line)
        if cfg.rl.enabled:
            from kltd.train.reinforce import reward_function

            self.reward = reward_function(cfg.rl.reward, self.data.checker)
        if [s.name for s in self.eval_sets] != ["heldout"]:
            self.out.say("evaluation sets: " + "; ".join(
                f"{s.name} ({len(s.examples)} questions, checker {s.checker_name}, {s.settings.max_new_tokens} tokens)"
                for s in self.eval_sets))

    def teacher_tokenizer(self, m):
        """The student's tokenizer, checked against the teacher's: the loaded teacher's files, or a served teacher's
        fingerprint (asked before any data or model is read: a wrong or absent server costs seconds)."""
        from kltd.train.models import check_tokenizers, load_tokenizer

        if m.teacher_server is None:
            return check_tokenizers(m.teacher, m.student, trust_remote_code=m.trust_remote_code)
        from kltd.rollout.remote_teacher import connect

        tokenizer = load_tokenizer(m.student, m.trust_remote_code)
        self.served = connect(m.teacher_server, m.teacher_top_k)
        info = self.served.check(tokenizer)
        self.out.say(f"teacher: '{info['model']}' served by {self.served.url}, top {self.served.top_k} of "
                     f"{info['vocab_size']} tokens and a tail per position")
        return tokenizer

    def load(self) -> None:
        """Both models (the student sharded before an optimiser is built on it), and the execution plan."""
        from kltd.rollout.plan import plan_for
        from kltd.train.models import load_pair
        from kltd.train.sharding import shard

        m, t = self.cfg.model, self.cfg.trainer
        with self.phases("loading"):
            self.pair = load_pair(m.teacher, m.student, m.dtype, m.device, tokenizer=self.tokenizer,
                                  teacher_device=m.teacher_device, gradient_checkpointing=t.gradient_checkpointing,
                                  trust_remote_code=m.trust_remote_code, lora=m.lora, remote_teacher=self.served)
            if self.cfg.distributed.strategy == "fsdp":
                shard(self.pair.student)
        self.plan = plan_for(self.cfg, self.pair.student, self.pair.teacher, self.pair.vocab_size,
                             evaluation_only=self.evaluation_only)

    def announce(self) -> None:
        """What runs, where it writes, what it approximates and how it runs; the progress display."""
        cfg, t = self.cfg, self.cfg.trainer
        self.out.show(f"[bold]{escape(cfg.method)}[/] (prefix={cfg.prefix.source}, "
                      f"trajectory={cfg.trajectory.supervisor}) on {self.pair.device}")
        self.out.say(f"run directory: {self.run_dir}")
        for line in approximations(cfg):  # what this config computes that is not exact (also in metrics.json)
            self.out.say(f"approximation: {line}")
        self.out.say(self.plan.line())
        for note in self.notes:
            self.out.say(f"note: {note}")
        # jobs of a sweep side by side share one log: their lines carry the run's name
        self.display = RunProgress(self.out.console, cfg.method, total_steps=self.last_step,
                                   done_steps=self.resume.progress.step if self.resume else 0,
                                   every_steps=t.log_every, every_s=t.progress_every_s,
                                   enabled=t.progress and self.out.active,
                                   prefix=f"[{self.run_dir.name}] " if self.sweep else "")

    def evaluate(self, step: int) -> dict | None:
        """The evaluation at `step` on every set of eval.sets (0: before training, read from the eval cache where it
        is there). Process 0 evaluates; a sharded student's processes all take part (its forward needs them all)."""
        from kltd.train.eval_cache import cached_evaluation, evaluation_inputs
        from kltd.train.evaluation import evaluate, logged_figures, sets_result

        if not (self.ranks.main or self.plan.training["student"].lockstep):
            return None  # the others go on to the next step and wait there
        p = self.pair
        when = "before training" if step == 0 else f"after step {step}"
        results = {}
        with self.phases("evaluation"):
            for s in self.eval_sets:
                on = f" on {s.name}" if len(self.eval_sets) > 1 else ""
                with self.display.phase(f"evaluation {when}{on}") as report:
                    def compute(s=s, report=report) -> dict:
                        return evaluate(p.student, p.teacher, p.tokenizer, s.examples, s.settings, checker=s.checker,
                                        vocab=p.vocab_size, plan=self.plan.evaluation, on_progress=report,
                                        engines=self.engines, exact=s.exact, served=self.served)

                    if step == 0 and self.plan.reuse_evaluation_before:  # the same for every cell and seed
                        inputs = evaluation_inputs(self.cfg, s, p.device, self.plan.evaluation, self.served)
                        results[s.name] = cached_evaluation(inputs, compute, Path(self.cfg.cache.dir), self.out.say)
                    else:
                        results[s.name] = compute()
        result = sets_result(results)
        self.out.log(logged_figures(result), step=step)
        return result

    @property
    def last_step(self) -> int:
        """The run's last step: the distillation's, then the RL stage's."""
        return self.cfg.trainer.max_steps + (self.cfg.rl.steps if self.cfg.rl.enabled else 0)

    def gate_horizon(self, step: int, result: dict | None) -> None:
        """An entropy-gated horizon decides after each evaluation during training (kltd.rollout.horizon), on process
        0's held-out entropy, the same in every process."""
        horizon = self.trainer.horizon
        if horizon.schedule != "entropy_gated":
            return
        entropy = self.ranks.sum([result["student_entropy"] if self.ranks.main else 0.0])[0]
        decision = horizon.gate(step, entropy)
        if decision is not None:
            self.out.log(decision.logged(), step=step)
            self.out.say(decision.line())

    def start(self) -> checkpoint.Progress:
        """Where training starts: the resumed checkpoint's progress, or step 0 after the evaluation before."""
        if self.resume is not None:
            progress = self.resume.progress
            self.resumed_from = progress.step
            if progress.step <= self.cfg.trainer.max_steps:  # a checkpoint of the RL stage is restored by it
                self.resume.restore(self.trainer)
        else:
            progress = checkpoint.Progress(eval_before=self.evaluate(0) if self.cfg.eval.before else None)
        self.ranks.broadcast_parameters(self.trainer.student)
        return progress

    def fill_teacher_cache(self, progress: checkpoint.Progress) -> None:
        """With fixed states the teacher's logits come from the cache: process 0 fills what this run will read
        (nothing once the distillation is done: the RL stage's states are the student's)."""
        if not self.plan.teacher_cache or progress.step >= self.cfg.trainer.max_steps:
            return
        from kltd.train.models import resolve_model_path
        from kltd.train.teacher_cache import cached_teacher

        cfg, p, trainer = self.cfg, self.pair, self.trainer

        def count(n: int) -> None:
            trainer.teacher_forwards += n

        with self.ranks.main_first(), self.phases("cache"), self.display.phase("teacher cache"):
            trainer.attach_teacher_cache(cached_teacher(
                p.teacher, p.tokenizer, resolve_model_path(cfg.model.teacher) if p.remote_teacher is None else "",
                resolve_model_path(cfg.model.student),
                self.data.train, cache_dir=Path(cfg.cache.dir), dtype=cfg.model.dtype, fmt=cfg.cache.format,
                top_k=cfg.cache.top_k, needed=trainer.planned_examples(), counter=count, echo=self.out.say,
                packed=self.plan.cache_fill_packed, scored=trainer.count_cache_fill, served=p.remote_teacher,
                temperature=cfg.loss.temperature))
        # the FLOPs of what process 0 filled (0 when the cache already held it), in every process's count
        trainer.flops.cache_fill += int(self.ranks.sum([trainer.cache_fill_flops])[0])
        trainer.cache_fill_flops = 0

    def save(self, progress: checkpoint.Progress, tokens: TokenCounts) -> Path:
        """A training checkpoint of this step. Process 0 writes it; the others take part only in gathering a
        sharded student's weights and state."""
        progress.tokens = dataclasses.asdict(tokens)
        gathering = self.plan.training["student"].lockstep
        state = checkpoint.snapshot(self.stepper) if self.ranks.main or gathering else None
        if not self.ranks.main:
            return checkpoint.path_for(self.run_dir, progress.step)
        return checkpoint.save(self.run_dir, state, progress, self.config_dict, self.cfg.trainer.keep_checkpoints)

    def train(self, progress: checkpoint.Progress) -> tuple[checkpoint.Progress, TokenCounts, float]:
        """The distillation's optimiser steps from where `progress` stands to trainer.max_steps (see `steps`).
        Returns the progress, the token counts and the training time of runs before this one (a resumed run
        trained before too). The evaluation before training costs 0."""
        from kltd.train.compute import FlopCounter, cost_metrics

        tokens = TokenCounts(**progress.tokens)
        self.session = (time.perf_counter(), progress.train_time_s, progress.step)
        if progress.step == 0:
            self.out.log(cost_metrics(FlopCounter(), TokenCounts(), 0, 0.0), step=0)
        with self.phases("training", timed=False):  # its seconds are the progress's training time (finish)
            self.steps(progress, tokens, last=self.cfg.trainer.max_steps, key="train")
        return progress, tokens, self.session[1]

    def reinforce(self, trained: tuple[checkpoint.Progress, TokenCounts, float]
                  ) -> tuple[checkpoint.Progress, TokenCounts, float]:
        """The RL stage after the distillation (kltd.train.reinforce): the evaluation after distillation, the
        starting policy kept, then rl.steps steps (a run resumed inside the stage restores it from its checkpoint)."""
        from kltd.train.reinforce import Reinforcer

        progress, tokens, time_before = trained
        t, rl = self.cfg.trainer, self.cfg.rl
        resumed_inside = progress.step > t.max_steps
        if not resumed_inside:
            progress.eval_after_distillation = self.evaluate(t.max_steps) if t.max_steps else progress.eval_before
            self.keep_starting_policy()
        self.stepper = Reinforcer(self.cfg, self.trainer, self.reward, reference=self.starting_policy(resumed_inside))
        if resumed_inside:
            self.resume.restore(self.stepper)
        self.out.say(f"RL stage: {rl.algorithm.upper()} for {rl.steps} steps after step {t.max_steps}, "
                     f"{rl.batch_size // rl.group_size} prompts x {rl.group_size} samples a micro-batch, up to "
                     f"{self.stepper.max_new_tokens} tokens, reward {rl.reward}")
        with self.phases("rl", timed=False):  # its seconds are in the progress's training time
            self.steps(progress, tokens, last=self.last_step, key="rl")
        return progress, tokens, time_before

    def keep_starting_policy(self) -> None:
        """The student the RL stage starts from, in before_rl/ (a model directory, as checkpoint/; a LoRA student's
        adapter, as adapter/): a result of its own, and the reference of rl.kl_weight when a run resumes inside the
        stage."""
        if self.ranks.main and (self.cfg.trainer.save_checkpoint or self.cfg.rl.kl_weight > 0):
            with self.phases("checkpoint"):
                if self.pair.adapter is not None:  # a LoRA student: its adapter, in peft's format
                    save_lora_student(self.pair, self.run_dir, merged=False, name=BEFORE_RL)
                else:
                    save_student(self.pair.student, self.pair.tokenizer, self.run_dir, name=BEFORE_RL)
        self.ranks.barrier()  # every process may read it back

    def starting_policy(self, resumed_inside: bool):
        """A frozen copy of the starting student for rl.kl_weight's penalty (None without one): the student now, or
        before_rl/'s weights in a run resumed inside the stage."""
        import copy

        from kltd.train.sharding import load_weights

        if self.cfg.rl.kl_weight == 0:
            return None
        if self.pair.adapter is not None:  # a LoRA student: the same base with a copy of the adapter
            from kltd.train.lora import load_adapter

            wrapper = copy.deepcopy(self.pair.adapter)
            if resumed_inside:
                load_adapter(wrapper, self.run_dir / BEFORE_RL)
            return wrapper.base_model.model.eval().requires_grad_(False)
        reference = copy.deepcopy(self.pair.student).eval().requires_grad_(False)
        if resumed_inside:
            load_weights(reference, self.run_dir / BEFORE_RL / checkpoint.WEIGHTS, self.pair.device)
        return reference

    def steps(self, progress: checkpoint.Progress, tokens: TokenCounts, *, last: int, key: str) -> None:
        """self.stepper's steps from where `progress` stands to `last`: logged (under `key`/) every trainer.log_every
        steps, evaluated every eval.every steps of the stage, checkpointed every trainer.checkpoint_every and at the
        end; a stop request (SIGTERM, Ctrl-C) ends it after the step with a checkpoint. Every logged row, and every
        step evaluated, carries the cumulative costs (kltd.train.compute.cost_metrics)."""
        from kltd.train.compute import cost_metrics

        e, t, stepper = self.cfg.eval, self.cfg.trainer, self.stepper
        session_started, time_before, first_step = self.session
        stage_start = t.max_steps if key == "rl" else 0
        with stop_requests() as stop:
            for step in range(progress.step + 1, last + 1):
                stats = stepper.step()
                tokens.add(stats.tokens)
                progress.step, progress.loss = step, stats.loss
                progress.trained_tokens += stats.trained_tokens
                progress.train_time_s = time_before + time.perf_counter() - session_started
                elapsed = progress.train_time_s
                self.display.step(StepFigures(step, stats.loss, progress.trained_tokens / elapsed, elapsed,
                                              session_steps=step - first_step, session_s=elapsed - time_before))
                cost = cost_metrics(stepper.flops, tokens, progress.trained_tokens, elapsed)
                evaluated = e.every and (step - stage_start) % e.every == 0 and step != last
                if step % t.log_every == 0 or step == last:
                    self.out.log({f"{key}/loss": stats.loss, **{f"{key}/{k}": v for k, v in stats.parts.items()},
                                  f"{key}/tokens_per_s": progress.trained_tokens / elapsed, **cost}, step=step)
                elif evaluated:  # the evaluation's row is read with the cost of its step
                    self.out.log(cost, step=step)
                if evaluated:
                    result = self.evaluate(step)
                    if key == "train":
                        self.gate_horizon(step, result)
                if self.ranks.any(stop.signum is not None):  # every process stops after the same step
                    raise Interrupted(stop.signum or signal.SIGTERM, step, self.save(progress, tokens))
                if step == last or (t.checkpoint_every and step % t.checkpoint_every == 0):
                    self.save(progress, tokens)

    def finish(self, trained: tuple[checkpoint.Progress, TokenCounts, float]) -> dict:
        """The evaluation after training, the trained student in checkpoint/, and the run's figures."""
        from kltd.train.compute import FORMULA
        from kltd.train.sharding import whole_weights

        progress, tokens, time_before = trained
        t, trainer, student = self.cfg.trainer, self.trainer, self.pair.student
        teacher_forwards = int(self.ranks.sum([trainer.teacher_forwards])[0])
        after = self.evaluate(self.last_step)
        # a sharded student's whole weights are gathered by every process
        weights = whole_weights(student) if t.save_checkpoint and self.plan.training["student"].lockstep else None
        if not self.ranks.main:
            return {}
        adapter = None
        with self.phases("checkpoint"):
            if not t.save_checkpoint:
                final = None
            elif self.pair.adapter is not None:  # a LoRA student: its adapter, and the merged model on request
                adapter, final = save_lora_student(self.pair, self.run_dir, self.cfg.model.lora.save_merged)
            else:
                final = save_student(student, self.pair.tokenizer, self.run_dir, weights)
        train_time = progress.train_time_s
        self.phases.add("training", train_time - time_before)  # this session's share
        return {
            "steps": self.last_step,  # the RL stage's included
            "train_time_s": train_time,
            "steps_per_s": self.last_step / train_time if train_time > 0 else None,
            "final_loss": progress.loss,
            "tokens": {**dataclasses.asdict(tokens), "trained": progress.trained_tokens},
            "teacher_forward_passes": teacher_forwards,  # training only (cache building included), all processes
            "compute": {"flops": trainer.flops.record(), "formula": FORMULA},  # all processes (kltd.train.compute)
            "skipped_steps": trainer.skipped_steps,
            "horizon": trainer.horizon.record(t.max_steps),  # a length schedule's course, else None
            "resumed_from_step": self.resumed_from,
            "eval_before": progress.eval_before,
            **({"rl": {"algorithm": self.cfg.rl.algorithm, "steps": self.cfg.rl.steps},
                "eval_after_distillation": progress.eval_after_distillation} if self.cfg.rl.enabled else {}),
            "eval_after": after,  # after the RL stage where there is one
            "checkpoint": str(final) if final else None,
            **({"adapter": str(adapter) if adapter else None} if self.pair.adapter is not None else {}),
        }
