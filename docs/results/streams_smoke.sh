#!/bin/bash
# Issue 5: a small Transformer++ and a small Hope through `nlcl run` on every new stream.
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
COMMON="model.d_model=64 model.n_layers=2 model.n_heads=4 trainer.epochs=1 trainer.batch_size=16 trainer.limit_train_batches=20 trainer.progress_bar=false logger=csv optim.lr=3e-3 experiment_name=streams_smoke hydra.sweep.dir=runs/streams_smoke"
declare -A OV
OV[knowledge]="task.countries_per_region=10 task.relations=[capital,currency]"
OV[knowledge_in_context]="task.countries_per_region=10 task.n_train=128 task.n_test=32"
OV[lm_domains]="task.seq_len=64 task.train_sequences=320 task.test_sequences=32 task.max_chars=200000"
OV[niah]="task.context_lens=[512] task.n_train=160 task.n_test=16 task.probes=[s_niah_1,s_niah_2,mk_niah]"
OV[mqar]="task.num_kv_pairs=[4,8] task.seq_len=64 task.n_train=320 task.n_test=64"
OV[formal_languages]="task.n_train=320 task.n_test=64 task.languages=[parity,anbn,shuffle2]"
OV[mad]="task.n_train=320 task.n_test=64"
for t in knowledge knowledge_in_context lm_domains niah mqar formal_languages mad; do
  for m in transformer hope; do
    .venv/bin/nlcl run -m task=$t model=$m $COMMON ${OV[$t]} "hydra.sweep.subdir=${t}_${m}" >> /tmp/exp/streams_$m.log 2>&1 &
  done
  wait
done

