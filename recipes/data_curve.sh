#!/usr/bin/env bash
# Issue 12: held-out acceptance against the amount of self-distilled training data, with everything else fixed.
# Each run trains the same drafter from scratch with the same flags, steps, schedule and seed on the first N token
# shards of recipes/data/sharegpt-sd (features from `round4.sh data`), and is scored on the same held-out set (339
# answers). `python recipes/learning_curve.py --curve` fits acc@d against answer tokens and says what would reach
# the issue's goals. Resumable: re-run a stage to continue it.
#   bash recipes/data_curve.sh subsets      # runs/data/sd4-train-N: the first N feature shards (symlinks)
#   bash recipes/data_curve.sh bf16features # runs/data/sd4-train-bf16: shards 0-14's features from a bf16 target pass
#   bash recipes/data_curve.sh round3       # runs/round3/KIND: the round-3 drafters (from git) the -ft runs start from
#   bash recipes/data_curve.sh round6       # runs/round6/KIND: the drafters shipped before round 7 (from git; falcon
#                                           # from round 5, eagle from round 6), which the -r7 runs start from
#   bash recipes/data_curve.sh round7       # runs/round7/KIND: the round-7 drafters, which the -r8 runs start from
#   bash recipes/data_curve.sh round8       # runs/round8/KIND: the round-8 falcon, which the -r9 run starts from
#   bash recipes/data_curve.sh round9       # runs/round9/KIND: the round-9 falcon (the averages read it)
#   bash recipes/data_curve.sh train NAME   # one run (names below); two at once on two cores, or one under
#                                           # FALCONSPEC="torchrun --standalone --nproc_per_node 2 falconspec"
#   bash recipes/data_curve.sh average NAME # runs/curve/NAME/drafter: the mean of shipped stages' weights (AVERAGE_OF;
#                                           # restore its inputs with the round stages first), scored like a run
#   bash recipes/data_curve.sh final NAME   # its drafter on the whole held-out split of the token set (NAME: a run,
#                                           # RUN-trained for an --ema-decay run's trained weights, or falcon, eagle
#                                           # or medusa for the shipped drafters); any clone runs it
#   WINDOW_SEED=N bash recipes/data_curve.sh final NAME # the same on another draw of the scored windows
#                                           # (runs/curve/final-wN/NAME; also for openings and mtb)
#   bash recipes/data_curve.sh openings NAME # final's scoring on answer openings only (windows starting in an
#                                           # answer's first 64 tokens, as the bench's answers); NAME as for final
#   bash recipes/data_curve.sh tau NAME     # tau at fixed 4- and 16-node trees on MT-bench first turns (10 prompts)
#   bash recipes/data_curve.sh mtbench      # runs/data/mtbench-sd: the target's own fp32 greedy answers to the 80
#                                           # MT-bench questions, both turns, 64 tokens each (as the bench asks), as
#                                           # tokens: the bench's answers as a held-out set (evaluation only)
#   bash recipes/data_curve.sh mtb NAME     # acc@1..8 of a drafter on them (NAME as for final)
# Paths are relative to the repository root; runs/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
FS=${FALCONSPEC:-.venv/bin/falconspec}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
FEATURES=runs/data/sd4-train   # `bash recipes/round4.sh data`
FEATURES_BF16=runs/data/sd4-train-bf16  # `bf16features`: shards 0-14, the target run in bfloat16
HELDOUT=runs/data/sd4-heldout
EVAL=runs/data/sd4-heldout-50  # in-training evaluations: the first held-out shard (50 sequences)
STEPS=${STEPS:-600}
RUNS=runs/curve
ROUND3=runs/round3             # `round3`: the round-3 drafters the fine-tunes start from, as shipped before round 4
ROUND3_COMMIT=40b336f
ROUND6=runs/round6             # `round6`: the drafters shipped before round 7, which the -r7 runs start from
ROUND6_COMMIT=7a61ebb
ROUND7=runs/round7             # `round7`: the round-7 drafters, which the -r8 runs start from
ROUND7_COMMIT=f22b7d2
ROUND8=runs/round8             # `round8`: the round-8 falcon, which the -r9 run starts from
ROUND8_COMMIT=4ebe087
ROUND9=runs/round9             # `round9`: the round-9 falcon, averaged with round 8's
ROUND9_COMMIT=8418bcd
declare -A PAST=([round3]="$ROUND3 $ROUND3_COMMIT falcon eagle medusa" [round6]="$ROUND6 $ROUND6_COMMIT falcon eagle"
                 [round7]="$ROUND7 $ROUND7_COMMIT falcon eagle" [round8]="$ROUND8 $ROUND8_COMMIT falcon"
                 [round9]="$ROUND9 $ROUND9_COMMIT falcon")
SIZES=(4 8 15 28 40 53 62)     # token shards: 53,633 / 146,848 / 292,810 / 657,560 / 998,940 / 1,335,931 /
                               # 1,592,965 answer tokens
FALCON="--k 2 --newest-pair --chain-slots"
MEDUSA="--kind medusa --medusa-heads 4"
TOKENS=recipes/data/sharegpt-sd  # the committed token shards, read by `falconspec train` directly
TOKENS_T07=recipes/data/sharegpt-sd-t07  # answers sampled at temperature 0.7 to the same train prompts (round 13)
GREEDY_22=runs/data/tokens-greedy-22  # `tokensubsets`: greedy train shards 0-21 and sampled shards 0-18, the answers
T07_19=runs/data/tokens-t07-19        # of the same ~1,140 conversations (483,484 and 486,840 answer tokens)
declare -A RUNS_OF=(
  [falcon-4]="$FALCON" [falcon-8]="$FALCON" [falcon-15]="$FALCON"
  [eagle-15]="--k 1"
  [falcon-15-dist1]="$FALCON --dist-weight 1.0"  # the token loss weighs as much as the feature regression (0.1)
  [falcon-15-bf16]="$FALCON --dtype bfloat16"     # falcon-15 in bf16 autocast: as good, and how much faster?
  [falcon-15-bf16-long]="$FALCON --dtype bfloat16"  # run with STEPS=1200: twice the steps, from scratch, same data
  [eagle-15-bf16-long]="--k 1 --dtype bfloat16"      # the k=1 head, the same (STEPS=1200)
  [falcon-28-bf16-long]="$FALCON --dtype bfloat16"  # every train shard (0-27), run with STEPS=2400
  [eagle-28-bf16-long]="--k 1 --dtype bfloat16"      # the k=1 head, the same (STEPS=2400)
  [falcon-15-topk]="$FALCON --dtype bfloat16 --distill-topk 8"  # falcon-15-bf16 with top-k distillation
  # the round-3 drafters fine-tuned on every train shard (0-27), as round 4 was on shards 0-7; run with STEPS=1200
  [falcon-28-ft]="$FALCON --dtype bfloat16 --init-from $ROUND3/falcon --lr 5e-4 --min-lr 5e-5"
  [eagle-28-ft]="--k 1 --dtype bfloat16 --init-from $ROUND3/eagle --lr 5e-4 --min-lr 5e-5"  # not run
  # every train shard (0-39), STEPS=1200: falcon-28-ft continued (the k=2 drafter trains its first token at half
  # the head's positions per step, so it gets two stages) and the round-3 eagle fine-tuned once: the round-4
  # drafters shipped. medusa-40-ft (STEPS=400, ~3.3 s a step): the round-3 heads, the same; not shipped
  [falcon-40-ft]="$FALCON --dtype bfloat16 --init-from $RUNS/falcon-28-ft/drafter --lr 5e-4 --min-lr 5e-5"
  [eagle-40-ft]="--k 1 --dtype bfloat16 --init-from $ROUND3/eagle --lr 5e-4 --min-lr 5e-5"
  [medusa-40-ft]="$MEDUSA --dtype bfloat16 --init-from $ROUND3/medusa --lr 5e-4 --min-lr 5e-5"
  # medusa-40-ft with 1,200 steps (STEPS=1200), since --dtype bfloat16 reaches the Medusa step (~2 s a step)
  [medusa-40-long]="$MEDUSA --dtype bfloat16 --init-from $ROUND3/medusa --lr 5e-4 --min-lr 5e-5"
  # training-time test as a fine-tuning stage of the shipped falcon (falcon-40-ft), against the same fine-tune
  # without it (same data, steps, schedule and seed); run with STEPS=300
  [falcon-40-ttt]="$FALCON --dtype bfloat16 --init-from $RUNS/falcon-40-ft/drafter --lr 5e-4 --min-lr 5e-5 --ttt-blocks 2"
  [falcon-40-more]="$FALCON --dtype bfloat16 --init-from $RUNS/falcon-40-ft/drafter --lr 5e-4 --min-lr 5e-5"
  # every position in the first slot once per pass: falcon-40-more with both block alignments of each sequence in
  # every step (twice the cost of a step; same data, steps, schedule and seed); run with STEPS=300
  [falcon-40-every]="$FALCON --dtype bfloat16 --init-from $RUNS/falcon-40-ft/drafter --lr 5e-4 --min-lr 5e-5 --every-alignment"
  # falcon-15-bf16 with both alignments per step, from scratch (STEPS=600): does the k=2 drafter's first token reach
  # the head's (eagle-15) when it is trained at as many positions per step?
  [falcon-15-every]="$FALCON --dtype bfloat16 --every-alignment"
  # round 5, shipped: the round-4 drafters fine-tuned on every train shard (0-52), falcon with both alignments per
  # step, the head as before; run with STEPS=600
  [falcon-53-every]="$FALCON --dtype bfloat16 --init-from $RUNS/falcon-40-ft/drafter --lr 5e-4 --min-lr 5e-5 --every-alignment"
  [eagle-53-more]="--k 1 --dtype bfloat16 --init-from $RUNS/eagle-40-ft/drafter --lr 5e-4 --min-lr 5e-5"
  # eagle-53-more's control: the same 600 steps on shards 0-39 only (does the gain come from the new shards?)
  [eagle-40-more]="--k 1 --dtype bfloat16 --init-from $RUNS/eagle-40-ft/drafter --lr 5e-4 --min-lr 5e-5"
  # round 6: the round-5 head fine-tuned 600 more steps on every train shard (0-61) (STEPS=600)
  [eagle-62-more]="--k 1 --dtype bfloat16 --init-from $RUNS/eagle-53-more/drafter --lr 5e-4 --min-lr 5e-5"
  # why k=2's first token learns at half the head's rate per step: falcon-15-bf16 with the block's later slot
  # weighted 0 (only the first slot, the depth-1 draft, is trained), 600 steps from scratch. If it matches the head
  # (eagle-15), training the second slot beside it is what slows the first; if not, the SAR block layout does
  [falcon-15-slot0]="$FALCON --dtype bfloat16 --later-slot-weight 0"
  # the rest of the first-token gap: CSGD's glancing (only first slots are glanced, and their losses are dropped)?
  # falcon-15-bf16 and falcon-15-slot0 with plain token-shift training, as the head trains (STEPS=600)
  [falcon-15-noglance]="$FALCON --dtype bfloat16 --no-glance"
  [falcon-15-slot0-noglance]="$FALCON --dtype bfloat16 --later-slot-weight 0 --no-glance"
  # falcon-15-slot0 with both alignments per step: every position trained once as a first slot, the head's loss
  # and positions per step in the k=2 block layout (STEPS=600)
  [falcon-15-slot0-every]="$FALCON --dtype bfloat16 --later-slot-weight 0 --every-alignment"
  # the newest-slots layout (--newest-slots): every slot of a k=2 block drafts from the block's newest position,
  # slot 0 as the head drafts, slot 1 by the chain on slot 0's token; falcon-15-bf16's data and steps, from scratch
  [falcon-15-newest]="--k 2 --newest-slots --dtype bfloat16"
  # round 6 candidate: the round-5 head (eagle-53-more) grown into a newest-slots k=2 drafter (its decoder drafts
  # slot 0, the chain starts at zero) and fine-tuned on every train shard (0-61) as eagle-62-more is (STEPS=600)
  [falcon-62-newest]="--k 2 --newest-slots --dtype bfloat16 --init-from $RUNS/eagle-53-more/drafter --lr 5e-4 --min-lr 5e-5"
  # falcon-15-newest with the later slot's losses stopped at the chain: the decoder learns slot 0 as the head does
  [falcon-15-newest-detach]="--k 2 --newest-slots --detach-chain --dtype bfloat16"
  # falcon-62-newest with the chain's gradients stopped (--detach-chain): the decoder fine-tunes as the head does
  # (eagle-62-more), the chain learns the second token on top (STEPS=600)
  [falcon-62-newest-detach]="--k 2 --newest-slots --detach-chain --dtype bfloat16 --init-from $RUNS/eagle-53-more/drafter --lr 5e-4 --min-lr 5e-5"
  # is the chain short of steps or of capacity? falcon-62-newest-detach continued 600 steps at the from-scratch
  # learning rate (STEPS=600)
  [falcon-62-newest-detach2]="--k 2 --newest-slots --detach-chain --dtype bfloat16 --init-from $RUNS/falcon-62-newest-detach/drafter"
  # does the second token need attention? The shipped round-6 head (eagle-62-more) grown into a newest-slots k=2
  # drafter with the chain's gradients stopped (the decoder fine-tunes slot 0 as the head; the chain starts at zero),
  # with the MLP chain alone, and with --chain-attention (the later slot also attends to the last layer's keys and
  # values of what the newest position sees); shards 0-14, same steps, schedule and seed (STEPS=600)
  [falcon-15-grown-chain]="--k 2 --newest-slots --detach-chain --dtype bfloat16 --init-from eagle --lr 5e-4 --min-lr 5e-5"
  [falcon-15-grown-attend]="--k 2 --newest-slots --detach-chain --chain-attention --dtype bfloat16 --init-from eagle --lr 5e-4 --min-lr 5e-5"
  # the reversed-slots layout (--reversed-slots): the paper's relaxed mask, the block's first token drafted from its
  # newest position and the second from the older one, which sees the whole block; falcon-15-noglance otherwise
  [falcon-15-reversed]="$FALCON --dtype bfloat16 --reversed-slots"
  # can features come from a bf16 target pass (~1.7x faster to build or to compute on the fly)? The k=1 head from
  # scratch on shards 0-14's features from the fp32 pass and from the bf16 pass (DATA_OF), same steps, schedule and
  # seed (STEPS=600); both scored on the fp32 held-out features
  [eagle-15-fp32feat]="--k 1 --dtype bfloat16"
  [eagle-15-bf16feat]="--k 1 --dtype bfloat16"
  # round 7: the shipped drafters fine-tuned straight from every committed token shard (TOKENS, no feature build),
  # the train features from a bf16 target pass, eagle from round 6's head, falcon from round 5's block with both
  # alignments per step as round 5 trained it (EVAL_OF: evaluated on held-out tokens); STEPS=600. They ran with
  # --init-from eagle|falcon before round 7 shipped, which named the same files as $ROUND6 (`round6` restores them)
  [eagle-r7]="--k 1 --dtype bfloat16 --feature-dtype bfloat16 --init-from $ROUND6/eagle --lr 5e-4 --min-lr 5e-5"
  [falcon-r7]="$FALCON --dtype bfloat16 --feature-dtype bfloat16 --init-from $ROUND6/falcon --lr 5e-4 --min-lr 5e-5 --every-alignment"
  # round 8: is round 7 short of steps (it read 2,400 of 8,943 sequences)? falcon-r7 continued with the same flags
  # on another data order (--seed 1, so ~73% of what it reads is new to it); run with STEPS=450 under
  # FALCONSPEC="torchrun --standalone --nproc_per_node 2 falconspec" (two processes: 8 sequences a step, 3,600 read)
  [falcon-r8]="$FALCON --dtype bfloat16 --feature-dtype bfloat16 --init-from $ROUND7/falcon --lr 5e-4 --min-lr 5e-5 --every-alignment --seed 1"
  # round 9: rounds 7 and 8 spent their first third recovering from the warm restart at lr 5e-4 (acc@1 0.536 -> 0.468
  # at step 100). falcon-r8 continued with a peak of 1.5e-4 (under a third) on a third data order (--seed 2), every
  # train shard (4.77M answer tokens); STEPS=400 under the same two-process torchrun as falcon-r8
  [falcon-r9]="$FALCON --dtype bfloat16 --feature-dtype bfloat16 --init-from $ROUND8/falcon --lr 1.5e-4 --min-lr 1.5e-5 --every-alignment --seed 2"
  # round 10: the average of rounds 8 and 9 (falcon-avg-r8r9, shipped as round 10) continued at a third of round 9's
  # peak (5e-5 -> 5e-6) on a fourth data order (--seed 3); STEPS=200 under the same two-process torchrun
  [falcon-r10]="$FALCON --dtype bfloat16 --feature-dtype bfloat16 --init-from $RUNS/falcon-avg-r8r9/drafter --lr 5e-5 --min-lr 5e-6 --every-alignment --seed 3"
  # round 11: the shipped falcon (falcon-avg-r8r9) continued at twice round 10's peak (1e-4 -> 1e-5) on a fifth data
  # order (--seed 4) with an exponential moving average of the weights (--ema-decay 0.99, ~100 steps): the drafter
  # saved is the average, the trained weights stay in checkpoint/ (scored as falcon-r11-trained); STEPS=300 under the
  # same two-process torchrun
  [falcon-r11]="$FALCON --dtype bfloat16 --feature-dtype bfloat16 --init-from $RUNS/falcon-avg-r8r9/drafter --lr 1e-4 --min-lr 1e-5 --every-alignment --seed 4 --ema-decay 0.99"
  # round 12: a second decoder layer (the paper's drafter has two) grown onto the shipped falcon (falcon-avg-r8r9): a
  # copy of its layer whose output projections start at zero, so it drafts as shipped until trained; round 9's peak
  # (1.5e-4 -> 1.5e-5) on a sixth data order (--seed 5); STEPS=300 under the same two-process torchrun as falcon-r11
  [falcon-r12-2layers]="$FALCON --dtype bfloat16 --feature-dtype bfloat16 --init-from $RUNS/falcon-avg-r8r9/drafter --num-layers 2 --lr 1.5e-4 --min-lr 1.5e-5 --every-alignment --seed 5"
  # round 12, second run: falcon-r12-2layers' grown layer stayed near the identity at 1.5e-4; the same growth with
  # the grown layer at the from-scratch peak (--grown-lr 1e-3, the rest at 1.5e-4); STEPS=150 (one session's room)
  [falcon-r12-grownlr]="$FALCON --dtype bfloat16 --feature-dtype bfloat16 --init-from $RUNS/falcon-avg-r8r9/drafter --num-layers 2 --lr 1.5e-4 --min-lr 1.5e-5 --grown-lr 1e-3 --every-alignment --seed 5"
  # round 13: fresh text or the same again? The shipped falcon fits the train shards it read most far better than
  # held-out text (recipes/fit_gap.py). One stage from it on answers sampled at temperature 0.7 to the train prompts
  # (TOKENS_T07, never read), against the same stage on the greedy answers it has read (same flags, steps, seed);
  # STEPS=150, one process and one thread each, side by side
  [falcon-r13-sampled]="$FALCON --dtype bfloat16 --feature-dtype bfloat16 --init-from $RUNS/falcon-avg-r8r9/drafter --lr 1.5e-4 --min-lr 1.5e-5 --every-alignment --seed 6"
  [falcon-r13-greedy]="$FALCON --dtype bfloat16 --feature-dtype bfloat16 --init-from $RUNS/falcon-avg-r8r9/drafter --lr 1.5e-4 --min-lr 1.5e-5 --every-alignment --seed 6"
  # round 14: which text trains a better drafter, the target's greedy answers or its sampled ones? From scratch on
  # each (GREEDY_22, T07_19: the same prompts, as many answer tokens), same flags, steps and seed; STEPS=600, one
  # process and one thread each, side by side
  [falcon-s-greedy]="$FALCON --dtype bfloat16 --feature-dtype bfloat16"
  [falcon-s-sampled]="$FALCON --dtype bfloat16 --feature-dtype bfloat16"
  # both texts together (twice the distinct answers, the same steps): does adding the sampled answers help?
  [falcon-s-mix]="$FALCON --dtype bfloat16 --feature-dtype bfloat16"
  # EAGLE-3-style multi-layer features on falcon-s-mix's text, flags, steps and seed (issue 12 part 2): the inputs
  # of target layers 2, 15 and 27 (EAGLE-3's low, middle and high, --feature-layers auto), or with 29 (the last
  # layer's input) as the high one; STEPS=600, one process and thread each
  [falcon-s-mix-fl]="$FALCON --dtype bfloat16 --feature-dtype bfloat16 --feature-layers auto"
  [falcon-s-mix-fl29]="$FALCON --dtype bfloat16 --feature-dtype bfloat16 --feature-layers 2,15,29"
  # round 15: the full schedule round 14 asks for: from scratch on every train sequence of both texts (the greedy
  # set and the whole sampled set, ~11,400 sequences), one pass; STEPS=1430 under FALCONSPEC="torchrun --standalone
  # --nproc_per_node 2 falconspec" (8 sequences a step), resumable across sessions (re-run it)
  [falcon-full-mix]="$FALCON --dtype bfloat16 --feature-dtype bfloat16"
  # its second pass, as rounds 7-8 continued theirs: warm restart at half the peak (5e-4 -> 5e-5), another data order
  # (--seed 1); STEPS=1430 under the same two-process torchrun, resumable across sessions
  [falcon-full-mix2]="$FALCON --dtype bfloat16 --feature-dtype bfloat16 --init-from $RUNS/falcon-full-mix/drafter --lr 5e-4 --min-lr 5e-5 --seed 1"
  # its third pass: warm restart at half the second's peak (2.5e-4 -> 2.5e-5), a third data order (--seed 2)
  [falcon-full-mix3]="$FALCON --dtype bfloat16 --feature-dtype bfloat16 --init-from $RUNS/falcon-full-mix2/drafter --lr 2.5e-4 --min-lr 2.5e-5 --seed 2"
  # round 16, second part: falcon-full-mix3 reading target layers 2 and 15 beside the last one (id 30: the output after
  # the final norm, what full-mix2 reads), grown from full-mix2 with those layers' weights at zero, so that it starts
  # as full-mix2 and the same steps, data order and seed as falcon-full-mix3 measure what the lower layers add
  [falcon-full-mix3-fl]="$FALCON --dtype bfloat16 --feature-dtype bfloat16 --init-from $RUNS/falcon-full-mix2/drafter --lr 2.5e-4 --min-lr 2.5e-5 --seed 2 --feature-layers 2,15,30"
  # round 17: does the k=1 head gain as much from the lower layers? The shipped head (eagle-r7, restored by `round7`)
  # grown by layers 2 and 15 the same way, on the same text, schedule and seed as falcon-full-mix3-fl (STEPS=1430
  # under the same two-process torchrun), so the in-training evaluations compare with that run step for step
  [eagle-full-mix3-fl]="--k 1 --dtype bfloat16 --feature-dtype bfloat16 --init-from $ROUND7/eagle --lr 2.5e-4 --min-lr 2.5e-5 --seed 2 --feature-layers 2,15,30"
  # twice the steps: falcon-N continued for STEPS more on the same data (fresh optimizer, warm restart at half the
  # peak learning rate, as the shipped rounds were continued)
  [falcon2x-4]="$FALCON --init-from $RUNS/falcon-4/drafter --lr 5e-4 --min-lr 5e-5"
  [falcon2x-15]="$FALCON --init-from $RUNS/falcon-15/drafter --lr 5e-4 --min-lr 5e-5"
)
# checkpoint averaging across continued stages (recipes/average_drafters.py, `average NAME`, no training): the inputs,
# restored by the round stages; scored with the flags of the kind the name starts with, on the token set
declare -A AVERAGE_OF=([falcon-avg-r8r9]="$ROUND8/falcon $ROUND9/falcon"
                       [falcon-avg-r7r8r9]="$ROUND7/falcon $ROUND8/falcon $ROUND9/falcon"
                       [falcon-avg-r8r9r10]="$ROUND8/falcon $ROUND9/falcon $RUNS/falcon-r10/drafter"
                       [eagle-avg-r6r7]="$ROUND6/eagle $ROUND7/eagle")
# the train stage's in-training evaluations: the first 50 held-out token sequences, so any clone runs them
HELDOUT_TOKENS="--eval-data $TOKENS --eval-samples 50"
declare -A EVAL_OF=([eagle-r7]=$HELDOUT_TOKENS [falcon-r7]=$HELDOUT_TOKENS [falcon-r8]=$HELDOUT_TOKENS
                    [falcon-r9]=$HELDOUT_TOKENS
                    [falcon-r10]=$HELDOUT_TOKENS [falcon-r11]=$HELDOUT_TOKENS [falcon-r12-2layers]=$HELDOUT_TOKENS
                    [falcon-r12-grownlr]=$HELDOUT_TOKENS [falcon-r13-sampled]=$HELDOUT_TOKENS
                    [falcon-r13-greedy]=$HELDOUT_TOKENS [falcon-s-greedy]=$HELDOUT_TOKENS
                    [falcon-s-sampled]=$HELDOUT_TOKENS [falcon-s-mix]=$HELDOUT_TOKENS
                    [falcon-s-mix-fl]=$HELDOUT_TOKENS [falcon-s-mix-fl29]=$HELDOUT_TOKENS
                    [falcon-full-mix]=$HELDOUT_TOKENS [falcon-full-mix2]=$HELDOUT_TOKENS
                    [falcon-full-mix3]=$HELDOUT_TOKENS [falcon-full-mix3-fl]=$HELDOUT_TOKENS
                    [eagle-full-mix3-fl]=$HELDOUT_TOKENS)
declare -A DATA_OF=([eagle-15-bf16feat]=$FEATURES_BF16 [eagle-r7]=$TOKENS [falcon-r7]=$TOKENS [falcon-r8]=$TOKENS
                    [falcon-r9]=$TOKENS [falcon-r10]=$TOKENS [falcon-r11]=$TOKENS
                    [falcon-r12-2layers]=$TOKENS [falcon-r12-grownlr]=$TOKENS
                    [falcon-r13-sampled]=$TOKENS_T07 [falcon-r13-greedy]=$TOKENS
                    [falcon-s-greedy]=$GREEDY_22 [falcon-s-sampled]=$T07_19
                    [falcon-s-mix]=$GREEDY_22,$T07_19 [falcon-s-mix-fl]=$GREEDY_22,$T07_19
                    [falcon-s-mix-fl29]=$GREEDY_22,$T07_19
                    [falcon-full-mix]=$TOKENS,$TOKENS_T07 [falcon-full-mix2]=$TOKENS,$TOKENS_T07
                    [falcon-full-mix3]=$TOKENS,$TOKENS_T07 [falcon-full-mix3-fl]=$TOKENS,$TOKENS_T07
                    [eagle-full-mix3-fl]=$TOKENS,$TOKENS_T07)  # else $FEATURES-N, N from the name
COMMON=(--eval-data $EVAL --max-len 1024 --batch-size 4 --draft-vocab 4096 --vocab-corpus sharegpt --lr 1e-3
        --min-lr 1e-4 --warmup 20 --max-steps $STEPS --eval-every 100 --save-every 100 --log-every 10
        --eval-samples 1000 --seed 0)
MTBENCH_TOKENS=runs/data/mtbench-sd  # `mtbench`; `mtb` computes their features as it reads them
if [[ "${1:-}" =~ ^(train|average|final|openings|tau|mtb)$ ]]; then
  name=${2:-}
  declare -A KIND_FLAGS=([falcon]="$FALCON" [eagle]="--k 1" [medusa]="$MEDUSA")
  if [[ $name =~ ^(falcon|eagle|medusa)$ && $1 =~ ^(final|openings|mtb)$ ]]; then  # a shipped drafter
    drafter=$name; flags=${KIND_FLAGS[$name]}; data=$TOKENS
  elif [[ -n "${AVERAGE_OF[$name]+x}" ]]; then
    drafter=$RUNS/$name/drafter; flags=${KIND_FLAGS[${name%%-*}]}; data=$TOKENS
  else
    run=$name weights=drafter
    if [[ $name == *-trained && -n "${RUNS_OF[${name%-trained}]+x}" && $1 =~ ^(final|openings|mtb)$ ]]; then
      run=${name%-trained} weights=checkpoint  # an --ema-decay run's trained weights (drafter/: their average)
    fi
    [[ -n "${RUNS_OF[$run]+x}" ]] || { echo "unknown run '$name': ${!RUNS_OF[*]}"; exit 2; }
    drafter=$RUNS/$run/$weights; flags=${RUNS_OF[$run]}; data=${DATA_OF[$run]:-$FEATURES-$(cut -d- -f2 <<< "$run")}
  fi
fi
case "${1:-}" in
  round3|round6|round7|round8|round9)  # the drafters shipped at a past commit, from git (--init-from falcon names today's)
    read -r dir commit kinds <<< "${PAST[$1]}"
    for kind in $kinds; do
      mkdir -p $dir/$kind
      for f in config.json model.safetensors recipe.json; do
        git show $commit:src/falconspec/assets/drafters/smollm2-135m-$kind/$f > $dir/$kind/$f
      done
    done ;;
  subsets)
    mkdir -p $EVAL && ln -sfn ../sd4-heldout/shard_00000.safetensors $EVAL/ && cp $HELDOUT/meta.json $EVAL/
    for n in "${SIZES[@]}"; do
      mkdir -p $FEATURES-$n && cp $FEATURES/meta.json $FEATURES-$n/
      for ((i = 0; i < n; i++)); do
        f=$(printf 'shard_%05d.safetensors' $i)
        [[ -f $FEATURES/$f ]] || { echo "$FEATURES/$f is missing: run bash recipes/round4.sh data"; exit 1; }
        ln -sfn ../sd4-train/$f $FEATURES-$n/$f
      done
    done ;;
  tokensubsets)  # views of the first train shards of the token sets (a manifest of them, shards/ linked)
    ${PYTHON:-.venv/bin/python} recipes/token_subset.py $TOKENS 22 $GREEDY_22
    ${PYTHON:-.venv/bin/python} recipes/token_subset.py $TOKENS_T07 19 $T07_19 ;;
  bf16features)
    $FS gen-data --from-tokens recipes/data/sharegpt-sd --split train --max-shards 15 --dtype bfloat16 \
      --out $FEATURES_BF16 ;;
  train)
    [[ -z "${AVERAGE_OF[$name]+x}" ]] || { echo "$name is an average of trained drafters: run 'average $name'"; exit 2; }
    # shellcheck disable=SC2086
    $FS train --data $data "${COMMON[@]}" ${EVAL_OF[$name]:-} ${RUNS_OF[$name]} --out $RUNS/$name ;;
  average)
    [[ -n "${AVERAGE_OF[$name]+x}" ]] || { echo "not an average: '$name' (${!AVERAGE_OF[*]})"; exit 2; }
    # shellcheck disable=SC2086
    ${PYTHON:-.venv/bin/python} recipes/average_drafters.py --out $drafter ${AVERAGE_OF[$name]} ;;
  final|mtb|openings)  # no training (--max-steps 0): the finished drafter on the whole held-out set (final), on
                       # its answer openings only (openings: drafting windows that start in an answer's first 64
                       # tokens, as the bench's answers are) or on the MT-bench answers (mtb), scored in float32 as
                       # the engine runs it (the last --init-from and --dtype win; --feature-dtype float32: no bf16
                       # target copy for a train split that is never read)
    # final: the token set's held-out split, all 110 sequences, features as runs/data/sd4-heldout's; mtb: every
    # MT-bench answer from its tokens (features computed as read, so multi-layer drafters score too; the same figures
    # as the stored features earlier rounds read)
    eval=$([[ $1 == mtb ]] && echo "$MTBENCH_TOKENS --eval-split all" || echo $TOKENS)
    declare -A OUT_OF=([final]=final [openings]=openings [mtb]=mtbench)
    opening=$([[ $1 == openings ]] && echo 64 || echo 0)
    window=${WINDOW_SEED:-0}  # another draw of the scored windows: WINDOW_SEED=N, written to runs/curve/STAGE-wN/
    # shellcheck disable=SC2086
    $FS train --data $data "${COMMON[@]}" --eval-data $eval $flags --init-from $drafter --dtype float32 \
      --feature-dtype float32 --max-steps 0 --eval-answer-opening $opening --eval-window-seed $window \
      --out $RUNS/${OUT_OF[$1]}$([[ $window == 0 ]] || echo "-w$window")/$name ;;
  mtbench)  # the bench's MT-bench questions ({"turns": [...]}), every turn answered by the target
    $FS gen-data --source mt-bench --mode self-distilled --format tokens --split all --out $MTBENCH_TOKENS \
      --max-len 1024 --max-new-tokens 64 --batch-size 40 --shard-size 80 --gen-dtype float32 ;;
  tau)
    method=$([[ $name == falcon* ]] && echo falcon || echo eagle)
    $FS bench --methods greedy $method@4 $method@16 --$method-drafter $RUNS/$name/drafter --datasets mt-bench \
      --max-turns 1 --num-prompts 10 --max-new-tokens 64 --threads 1 --no-progress --resume --out $RUNS/$name/tau ;;
  *) echo "usage: $0 subsets | tokensubsets | bf16features | round3 | round6 | round7 | round8 | round9 | train NAME | average NAME | final NAME | openings NAME | tau NAME | mtbench | mtb NAME"; exit 2 ;;
esac
