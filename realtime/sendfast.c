/* realtime._native.sendfast: one non-blocking send(2) on a socket, from C.
 *
 * send(fd, data) -> int: sends what the socket takes now of ``data`` (bytes) with
 * MSG_DONTWAIT | MSG_NOSIGNAL and returns how many bytes are left unsent (0: all of it);
 * -1 when the socket reported an error other than "would block" (the caller hands the
 * bytes to its transport, which meets the error itself and closes the connection).
 * The GIL is kept: a non-blocking send never waits.
 *
 * Built beside the mypyc modules by realtime/native_build.py; realtime/writer.py uses it
 * where it was built (see its module docstring for when a write may go this way).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <sys/socket.h>
#include <sys/types.h>

static PyObject *
sendfast_send(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "send(fd, data) takes two arguments");
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]);
    if (fd == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (fd < 0 || fd > 0x7fffffffL) {
        PyErr_SetString(PyExc_ValueError, "send: fd out of range");
        return NULL;
    }
    PyObject *data = args[1];
    if (!PyBytes_Check(data)) {
        PyErr_SetString(PyExc_TypeError, "send: data must be bytes");
        return NULL;
    }
    const char *buf = PyBytes_AS_STRING(data);
    Py_ssize_t size = PyBytes_GET_SIZE(data);
    Py_ssize_t left = size;
    while (left > 0) {
        ssize_t sent = send((int)fd, buf + (size - left), (size_t)left,
                            MSG_DONTWAIT | MSG_NOSIGNAL);
        if (sent > 0) {
            left -= sent;
            continue;
        }
        if (sent < 0 && errno == EINTR) {
            continue;
        }
        if (sent < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
            return PyLong_FromLong(-1);
        }
        break; /* would block (or sent nothing): the rest waits for the transport */
    }
    return PyLong_FromSsize_t(left);
}

static PyMethodDef sendfast_methods[] = {
    {"send", (PyCFunction)(void (*)(void))sendfast_send, METH_FASTCALL,
     "send(fd, data) -> bytes left unsent (0: all sent), or -1 on a socket error."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef sendfast_module = {
    PyModuleDef_HEAD_INIT, "sendfast", "One non-blocking send(2) from C.", -1,
    sendfast_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit_sendfast(void)
{
    return PyModule_Create(&sendfast_module);
}
