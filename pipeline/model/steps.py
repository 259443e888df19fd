"""The synchronous data-parallel train and eval steps, the same on CPU, N GPUs and N machines.

``keras.Model.fit`` is not used because Keras 3.15's TensorFlow trainer
fails under MultiWorkerMirroredStrategy: it ``strategy.reduce("MEAN", x,
axis=0)``s scalar metrics ("Invalid reduction dimension 0 for input with 0
dimensions") and eagerly reduces the first input batch to build the model
(keras-team/keras#20585, tensorflow/tensorflow#72388). A plain
``strategy.run`` step avoids both and gives one code path for every device
setup, so the CPU tests exercise what the GPUs run. The Keras optimizer still
does the cross-replica gradient sum (and, for float16, loss scaling).
"""

from __future__ import annotations


class Steps:
    def __init__(self, model, optimizer, strategy, global_batch: int, xla: bool):
        import keras
        import tensorflow as tf

        self.model, self.optimizer, self.strategy = model, optimizer, strategy
        per_example = keras.losses.SparseCategoricalCrossentropy(reduction=None)

        def replica_gradients(x, y):
            with tf.GradientTape() as tape:
                probs = tf.cast(model(x, training=True), tf.float32)
                losses = per_example(y, probs)
                loss = tf.nn.compute_average_loss(losses, global_batch_size=global_batch)
                scaled = optimizer.scale_loss(loss)
            grads = tape.gradient(scaled, model.trainable_variables)
            return grads, tf.reduce_sum(losses), _correct(probs, y)

        def replica_eval(x, y):
            probs = tf.cast(model(x, training=False), tf.float32)
            return tf.reduce_sum(per_example(y, probs)), _correct(probs, y), tf.cast(tf.shape(y)[0], tf.float32)

        # XLA compiles the training forward and backward pass only. With the optimizer's cross-replica
        # gradient sum inside, and likewise with the evaluation step, an XLA cluster on one replica
        # tried to read another replica's variables and failed ("Trying to access resource ...
        # located in device CPU:1 from device CPU:0"; MirroredStrategy over two logical CPUs).
        replica_gradients = tf.function(replica_gradients, jit_compile=xla)
        replica_eval = tf.function(replica_eval)

        def replica_train(x, y):
            grads, loss_sum, correct = replica_gradients(x, y)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss_sum, correct
        total = lambda v: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)  # noqa: E731

        @tf.function
        def train_step(iterator):
            x, y = next(iterator)
            return tuple(total(v) for v in strategy.run(replica_train, args=(x, y)))

        @tf.function
        def eval_step(batch):
            return tuple(total(v) for v in strategy.run(replica_eval, args=batch))

        self._train_step, self._eval_step = train_step, eval_step

    def distribute(self, dataset):
        return self.strategy.experimental_distribute_dataset(dataset)

    def train_step(self, iterator):
        """One synchronous step: (sum of losses, correct predictions) over the global batch, as tensors.

        Tensors, not floats: reading them back would wait for the GPU after every
        step; summed as tensors, the host runs ahead and the device never idles.
        """
        return self._train_step(iterator)

    def evaluate(self, dataset) -> tuple[float, float]:
        """(mean loss, accuracy) over ``dataset``, counted across all replicas and workers."""
        loss = correct = count = 0.0
        for batch in self.distribute(dataset):
            l_, c_, n_ = self._eval_step(batch)
            loss, correct, count = loss + float(l_), correct + float(c_), count + float(n_)
        return (loss / count, correct / count) if count else (float("nan"), float("nan"))


def _correct(probs, y):
    import tensorflow as tf

    predicted = tf.argmax(probs, axis=-1, output_type=tf.int64)
    return tf.reduce_sum(tf.cast(tf.equal(predicted, tf.cast(y, tf.int64)), tf.float32))
