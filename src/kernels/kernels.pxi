# The update-rule kernels, compiled once per instruction-set variant: setup.py
# generates one stub module per variant that includes this file, and
# fastdescent._dispatch imports the widest one the CPU supports.
from cython cimport floating

include "_common.pxi"
include "_storage.pxi"
include "_direct.pxi"
include "sgd.pxi"
include "_adaptive.pxi"
include "rprop.pxi"
include "asgd.pxi"
include "muon.pxi"
include "adagrad.pxi"
include "adadelta.pxi"
include "rmsprop.pxi"
include "adam.pxi"
include "adafactor.pxi"
include "lion.pxi"
include "schedule_free.pxi"
include "adamax.pxi"
include "nadam.pxi"
include "radam.pxi"
include "norms.pxi"
include "accumulate.pxi"
include "averaging.pxi"
include "bandwidth.pxi"
