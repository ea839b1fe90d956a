# The harness drives this shell over ttyS1 (tests/vm/console.py): no echo, no
# line editing, no colours, no pager, wide lines, no history on disk.
stty -echo cols 250 rows 50 2>/dev/null
set +o emacs +o vi
unset HISTFILE
export TERM=dumb PAGER=cat SYSTEMD_PAGER= SYSTEMD_COLORS=0 LANG=C.UTF-8
PS1='vm# '
PS2=''
