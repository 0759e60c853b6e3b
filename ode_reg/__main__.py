from ode_reg.cli import main

if __name__ == "__main__":
    main()
