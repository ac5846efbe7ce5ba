mod lock;
