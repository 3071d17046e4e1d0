import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(scope='module')
def one_torch_thread():
    """For modules of tiny models: one intra-op thread is faster than two fighting over CI's 2 cores. Restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_image_folder(root, per_class, size, classes=('a', 'b'), seed=0):
    """A tiny ImageFolder of random RGB PNGs: root/<class>/<i>.png."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(os.path.join(root, c))
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(os.path.join(root, c, f'{i}.png'))
    return root
