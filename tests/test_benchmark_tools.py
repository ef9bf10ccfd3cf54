# ruff: noqa: E501  (HLO lines as XLA writes them)
"""The benchmarks' readers of compiled programs: the buffers at a peak, and the memory budget."""

import jax
import jax.numpy as jnp

from benchmarks import hlo, train_memory

HLO = f"""HloModule jit_step, is_scheduled=true

FileNames
1 "/site-packages/optax/_src/transform.py"
2 "{hlo.ROOT}/optax_lean/_src/sharding.py"

FunctionNames
1 "update_fn"
2 "einsum"

FileLocations
1 {{file_name_id=1 function_name_id=1 line=10 end_line=10 column=1 end_column=1}}
2 {{file_name_id=2 function_name_id=2 line=208 end_line=208 column=3 end_column=3}}

StackFrames
1 {{file_location_id=1 parent_frame_id=1}}
2 {{file_location_id=2 parent_frame_id=1}}

ENTRY %main (param.1: f32[4,8]) -> f32[4,8] {{
  %param.1 = f32[4,8]{{1,0}} parameter(0), metadata={{op_name="state.params['w']"}}
  %all-gather.3 = f32[32,8]{{1,0}} all-gather(%param.1), dimensions={{0}}, metadata={{op_name="jit(step)/dot_general" stack_frame_id=2}}
  %pair = (f32[2]{{0}}, f32[16,8]{{1,0}}) fusion(%param.1), kind=kLoop, calls=%f, metadata={{op_name="jit(step)/add" stack_frame_id=1}}
  ROOT %copy = f32[4,8]{{1,0}} copy(%param.1)
}}
"""

LIVE = """HloLiveRange (max 4):
  Live ranges at 2 (peak):
    param.1{}: 128 bytes (cumulative: 128 bytes)
    all-gather.3{}: 1024 bytes (cumulative: 1152 bytes)
    pair{1}: 512 bytes (cumulative: 1664 bytes)
  Stack trace breakdown for peak usage: 1664 bytes
"""


def test_peak_buffers_name_op_shape_and_source():
  buffers = hlo.peak_buffers(LIVE, HLO)
  assert [b.name for b in buffers] == ['all-gather.3', 'pair{1}', 'param.1']  # largest first
  gathered, second, param = buffers
  assert (gathered.size, gathered.op, gathered.shape) == (1024, 'all-gather', 'f32[32,8]')
  assert gathered.jax_op == 'jit(step)/dot_general'
  assert gathered.source == 'optax_lean/_src/sharding.py:208 (einsum)'
  assert (second.op, second.shape) == ('fusion:Loop', 'f32[16,8]')  # the tuple's element 1
  assert second.source == 'optax/_src/transform.py:10 (update_fn)'
  assert (param.op, param.jax_op, param.source) == ('parameter', "state.params['w']", '')


def test_buffers_group_by_op_and_source_largest_total_first():
  made = lambda name, size, source: hlo.Buffer(name, size, 'all-gather', 'f32[8]', 'dot', source)
  groups = hlo.group_buffers(
    [made('a', 10, 'x.py:1'), made('b', 30, 'y.py:2'), made('c', 25, 'x.py:1')]
  )
  assert [(g.count, g.size, g.largest.name) for g in groups] == [(2, 35, 'c'), (1, 30, 'b')]


def test_budget_is_adamws_peak_less_the_state_saved_plus_five_percent():
  def measured(peak, state):
    return train_memory.Measurement(0, 0, 0, 0, peak, 0.0, state, state, True)

  adamw, lean = measured(peak=1000, state=300), measured(peak=900, state=100)
  assert train_memory.budget_bytes(lean, adamw) == 1000 - 200 + 50
  assert train_memory.adamw_counterpart('galore+remat+scan') == 'adamw+remat+scan'
  assert train_memory.adamw_counterpart('rso') == 'adamw'


def test_single_device_labels_are_galores_7b_setup(tmp_path):
  one = train_memory.config_for('7b', 'adamsnsm+galore_1x256', 'fsdp=8', 8, str(tmp_path))
  sixteen = train_memory.config_for('7b', 'galore+galore_16x256', 'fsdp=8', 8, str(tmp_path))
  for cfg, sequences in ((one, 1), (sixteen, 16)):
    assert (cfg.mesh, cfg.batch_size, cfg.seq_len) == ('fsdp=1', sequences, 256)
    assert (cfg.param_dtype, cfg.compute_dtype, cfg.state_dtype) == ('bfloat16', 'bfloat16', 'int8')
    assert cfg.layerwise and cfg.scan_layers and cfg.rank == 1024
  assert (one.remat, sixteen.remat) == (False, True)
  assert one.optimizer == 'adamsnsm' and sixteen.optimizer == 'galore'


def test_decompositions_in_a_loop_count_once_per_trip():
  one_by_one = jax.jit(lambda x: jax.lax.map(lambda m: jnp.linalg.qr(m)[0], x))
  batched = jax.jit(lambda x: jnp.linalg.qr(x)[0])
  stack = jax.ShapeDtypeStruct((3, 8, 8), jnp.float32)
  looped, whole = (
    hlo.decomposition_work(f.lower(stack).compile().as_text()) for f in (one_by_one, batched)
  )
  assert looped.matrices['geqrf'] == whole.matrices['geqrf'] == 3
  assert looped.flops == whole.flops > 0


def test_state_plot_labels_keep_clear_of_each_other_and_of_the_points():
  from examples.llama.compare import label_positions

  # Three optimizers at almost the same state and loss, as sumo, sumo_sn and adamsnsm are.
  points = [(22.6, 1.7826), (25.1, 1.7833), (22.6, 1.7887), (100.0, 1.8816)]
  names = ['adamsnsm 0.03', 'sumo 0.01', 'sumo_sn 0.01', 'adamw 0.001']
  span = 1.8816 - 1.7826
  labels = label_positions(points, names, span)
  boxes = [
    (x if align == 'left' else x - 0.8 * len(name), y, len(name))
    for (x, y, align), name in zip(labels, names)
  ]
  for i, (left, bottom, chars) in enumerate(boxes):
    for other_left, other_bottom, other_chars in boxes[i + 1 :]:
      apart_x = left + 0.8 * chars <= other_left or other_left + 0.8 * other_chars <= left
      assert apart_x or abs(bottom - other_bottom) >= 0.04 * span
  assert labels[3] == (101.0, 1.8816, 'left')  # a label with room stays beside its point
